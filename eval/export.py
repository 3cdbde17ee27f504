"""Hand a trained encoder to the usual tools: ``model.safetensors`` + ``config.json`` that torchvision and timm load.

    python -m eval.export --checkpoint runs/sslfer/backbone.pt --out exported/sslfer

Writes ``OUT/model.safetensors`` (the backbone's weights under torchvision's ResNet names, no classifier) and
``OUT/config.json``: architecture, stem width, feature size, the preprocessing the encoder was trained with
(input size, resize, mean, std, channel order) and where it came from (run folder, seed, steps, strategies).
The run's resolved ``config.yaml`` next to ``backbone.pt`` supplies the preprocessing; without it, pass
``--run-config``. At width 64 (the paper's ResNets) a stock model loads it with strict keys::

    model = torchvision.models.resnet50(); model.fc = torch.nn.Identity()
    model.load_state_dict(safetensors.torch.load_file("OUT/model.safetensors"))
    # or: model = timm.create_model("resnet50", num_classes=0); model.load_state_dict(...)

Other widths are this project's ``pretrain.model.ResNetBackbone(arch, width)``, which loads the same file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from common.errors import ConfigError

FORMAT_VERSION = 1


def _run_settings(run_config: Path | None) -> dict[str, Any]:
    if run_config is None or not run_config.is_file():
        raise ConfigError(
            f"--run-config: the run's config.yaml was not found ({run_config}); pretraining writes it next to "
            "backbone.pt: pass --run-config RUN/config.yaml"
        )
    try:
        data = yaml.safe_load(run_config.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"--run-config {run_config}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"--run-config {run_config}: not a mapping of config keys")
    return data


def export_backbone(checkpoint: str | Path, out: str | Path, run_config: str | Path | None = None) -> Path:
    """Write ``out/model.safetensors`` and ``out/config.json`` for ``checkpoint`` (a backbone.pt)."""
    from safetensors.torch import save_file

    from pretrain.model import infer_model_config, load_backbone

    checkpoint = Path(checkpoint)
    try:
        backbone = load_backbone(checkpoint)
    except FileNotFoundError as err:
        raise ConfigError(f"--checkpoint: {err}") from err
    model = infer_model_config(backbone.state_dict())
    run_config = Path(run_config) if run_config else checkpoint.with_name("config.yaml")
    run = _run_settings(run_config)
    augment, sampling = run.get("augment") or {}, run.get("sampling") or {}
    state = {k: v.contiguous() for k, v in backbone.state_dict().items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / "model.safetensors", metadata={"format": "pt", "arch": model.arch})
    config = {
        "format_version": FORMAT_VERSION,
        "architecture": model.arch,
        "width": model.width,
        "torchvision_compatible": model.width == 64,
        "num_features": [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)][
            -1
        ].num_features,
        "preprocessing": {
            "input_size": int(augment.get("crop", 112)),
            "resize": int(augment.get("resize", 128)),
            "mean": list(augment.get("mean", [0.485, 0.456, 0.406])),
            "std": list(augment.get("std", [0.229, 0.224, 0.225])),
            "channel_order": "RGB",
            "value_range": "[0, 1] before normalisation",
            "face_crop": "aligned face crops as written by `python -m data_shards ingest`",
        },
        "training": {
            "run_dir": str(checkpoint.parent),
            "seed": run.get("seed"),
            "max_steps": run.get("max_steps"),
            "strategy": sampling.get("strategy"),
            "hard_negatives": sampling.get("hard_negatives"),
            "faceswap": (run.get("faceswap") or {}).get("enabled"),
            "maskfn": (run.get("loss") or {}).get("fn_mode"),
        },
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.export", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="RUN/backbone.pt")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--run-config", default=None, help="the run's config.yaml (default: beside the checkpoint)"
    )
    args = parser.parse_args(argv)
    try:
        out = export_backbone(args.checkpoint, args.out, args.run_config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out / 'model.safetensors'} and {out / 'config.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

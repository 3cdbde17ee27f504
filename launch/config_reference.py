"""Write docs/CONFIG.md: every config key of every entry point, with its default and meaning.

    python -m launch.config_reference            # rewrite docs/CONFIG.md
    python -m launch.config_reference --check    # exit 1 if docs/CONFIG.md is stale (the test suite runs this)

Meanings come from the trailing ``# comment`` on each dataclass field, so the code stays the one source.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import sys
import typing
from pathlib import Path

from common.configio import to_dict

ENTRY_POINTS = [
    ("Pretraining (`launch/pretrain.py`, `launch/ray_pretrain.py`)", "pretrain.config", "PretrainConfig"),
    ("Evaluation (`python -m eval --config`, `key=value`)", "eval.fanout", "EvalConfig"),
]
OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md"
# Meanings for fields whose definition carries no trailing comment (keyed by dotted path).
MEANINGS = {
    "seed": "seeds weights, frame choice and augmentation (with epoch, rank and batch index)",
    "device": "auto: cuda when available, else cpu",
    "precision": "bf16 autocast on GPU (BatchNorm buffers handled); fp32 on CPU for exactness",
    "zero_stage": "DeepSpeed ZeRO stage (0: plain data parallel; 1: optimizer states sharded; 2: + gradients)",
    "dist_timeout_s": "collective timeout: ranks exit instead of hanging when a peer dies",
    "nan_policy": "non-finite loss: skip the step (counted) or stop with a clear error",
    "data.seed": "seeds the per-epoch shard shuffle and the shuffle buffers",
    "data.pipeline": "torch (batched tensor ops), dali (DALI decode + augment), torchvision (DataLoader fallback)",
    "sampling.strategy": "simclr: two views of one frame; timeaug: the positive is another frame of the clip",
    "sampling.positive_offsets_s": "TimeAug offsets in seconds (2..6 frames at 25/6 fps), either direction",
    "sampling.weight_mode": "offset weights: a uniform, b increasing with distance, c decreasing (paper default)",
    "sampling.short_clip_policy": "clips too short for an offset/hard negative: clamp (use what fits) or skip",
    "augment.resize": "frames are resized to this before the random crop",
    "augment.crop": "random crop size fed to the model",
    "augment.flip_p": "horizontal flip probability",
    "augment.jitter_p": "colour jitter probability (second family; first family see below)",
    "augment.jitter_always_first_family": "A/NA are always jittered, as in the paper's first transform",
    "augment.blur_p": "Gaussian blur probability",
    "augment.blur_sigma": "blur sigma range (pixels)",
    "augment.gray_p": "grayscale probability",
    "augment.mask_p": "landmark mask probability: an ellipse over one eye or the mouth, filled with the mean",
    "augment.mask_min_aspect": "minimum minor/major axis ratio of the mask ellipse",
    "augment.mean": "normalisation mean (ImageNet)",
    "augment.std": "normalisation std (ImageNet)",
    "augment.channels_last": "produce views in channels_last (must match model.channels_last)",
    "faceswap.p": "probability that a positive's inner face is swapped onto a donor of another identity",
    "loss.temperature": "InfoNCE temperature tau",
    "descriptors.kind": "MaskFN mouth-eye descriptor: landmarks (geometry) or cnn (frozen CNN from weights_path)",
    "model.arch": "torchvision ResNet depth",
    "optim.weight_decay": "L2 weight decay (AdamW-style when decoupled_weight_decay)",
    "optim.betas": "Adam betas",
    "optim.eps": "Adam epsilon",
    "optim.min_lr_ratio": "cosine floor as a fraction of lr",
    "metrics.enabled": "start the per-rank Prometheus exporter",
    "metrics.address": "exporter bind address (loopback unless SSLFER_METRICS_PUBLIC=1)",
    "store.backoff_max_s": "longest wait between store retries",
    "store.connect_timeout_s": "object-store connect timeout",
    "store.read_timeout_s": "object-store read timeout",
    "checkpoints": "backbone.pt paths (--checkpoint)",
    "data": "frames dataset URLs (--data)",
    "tasks": "expression, va, identity, finetune (--tasks)",
    "out": "output folder (--out)",
    "seeds": "probe seeds per cell (--seeds)",
    "features.batch_size": "images per forward pass",
    "probes.weight_decays": "linear-probe weight decays tried; the best on validation is kept",
    "probes.lbfgs_max_iter": "L-BFGS iterations of the linear probe",
    "probes.knn_k": "neighbours of the cosine k-NN probe",
    "probes.ridge_alphas": "ridge penalties tried for V/A; the best on validation is kept",
    "probes.val_fraction": "identities carved from train for model selection",
    "probes.verification_pairs": "same/different pairs for verification AUC/EER",
    "finetune.head_dims": "MLP head hidden sizes (paper: 1024, 512)",
    "finetune.dropout": "head dropout",
    "finetune.lr": "Adam learning rate",
    "finetune.weight_decay": "Adam weight decay",
    "finetune.batch_size": "images per step",
    "finetune.epochs": "epochs; the best validation epoch is kept",
    "finetune.resize": "resize before the crop",
    "finetune.crop": "crop size",
    "finetune.val_fraction": "share of training data carved out for validation",
    "finetune.device": "auto | cpu | cuda",
    "ray.address": "local (in-process), auto (running cluster) or an address",
    "ray.cpus_per_task": "CPU request of each task",
    "ray.probe_gpus": "GPUs requested by probe tasks",
    "ray.max_retries": "retries of a failed task",
    "ray.task_timeout_s": "seconds without any task finishing before a clear timeout error",
}
FIELD_LINE = re.compile(r"^\s*(\w+)\s*:\s*[^=#]+(?:=[^#]*)?#\s*(.+)$")


def _field_comments(cls: type) -> dict[str, str]:
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for line in source.splitlines():
            match = FIELD_LINE.match(line)
            if match:
                comments[match.group(1)] = match.group(2).strip()
    return comments


def _type_text(tp: typing.Any) -> str:
    text = getattr(tp, "__name__", None) if isinstance(tp, type) else None
    text = text or str(tp).replace("typing.", "").replace("NoneType", "None")
    return text.replace("|", "\\|")


def _rows(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    rows = []
    instance = cls()
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    nested = []
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            nested.append((f.name, type(value)))
            continue
        default = to_dict(value)
        meaning = comments.get(f.name) or MEANINGS.get(prefix + f.name, "")
        rows.append((prefix + f.name, _type_text(hints[f.name]), f"`{default!r}`", meaning))
    for name, sub in nested:
        rows += _rows(sub, prefix + name + ".")
    return rows


def render() -> str:
    out = [
        "# Configuration reference",
        "",
        "Generated by `python -m launch.config_reference` from the config dataclasses (do not edit by hand).",
        "Every key can be set in the YAML file given to `--config` or as a `key=value` override (dotted keys for",
        "nested sections). Unknown keys and wrong types are errors that name the key.",
        "",
    ]
    for title, module, name in ENTRY_POINTS:
        cls = getattr(importlib.import_module(module), name)
        out += [f"## {title}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        out += [f"| `{k}` | {t} | {d} | {c} |" for k, t, d, c in _rows(cls)]
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if docs/CONFIG.md is not current")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT} is stale: run python -m launch.config_reference", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``precision``: fp32, bf16_autocast (fp32 weights, bf16 autocast forward) and bf16_weights (DeepSpeed bf16).

bf16_autocast is checked on 2 CPU ranks through the real `deepspeed` launcher: on the same first batch and the
same initial weights its loss and gradients agree with fp32 within the bounds below, the embeddings really come
out of autocast in bf16 while every weight and gradient stays fp32, a run trains, and resume stays bit-exact.

The bounds come from measurement on this test's setting (8-wide ResNet-18, 48 px crops, 2 ranks x 8 images,
seeds 0, 1, 2): with BatchNorm in training mode (normal training) the loss differs from fp32 by 4.0e-3, 3.5e-3,
4.3e-3 (relative) and the flattened gradients have cosine 0.835, 0.895, 0.965; with BatchNorm on running
statistics (``freeze_bn_stats=true``) 4.0e-5 and 0.988. The spread in training mode is the objective's own
sensitivity at initialisation (batch statistics, tau = 0.07), not a fault of autocast: in one process on the
16-wide smoke model, rounding only the input images to bf16 with everything else fp32 already gives a loss
error of 4.3e-3 and a gradient cosine of 0.974 against fp64, and DeepSpeed's bf16 weights give 0.820 here.

This file is also the worker: ``deepspeed --num_gpus 2 tests/test_precision.py OUT CONFIG CASES... -- KEY=VALUE...``
(a case is ``name:key=value;key=value``) saves, per case, the rank-averaged loss of one forward/backward on the
first batch, every parameter's full gradient, the initial weights and the dtypes seen.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.configio import load_config  # noqa: E402
from common.errors import ConfigError  # noqa: E402
from pretrain.distributed import free_port  # noqa: E402
from pretrain.ds_config import build_ds_config, merge_user_config  # noqa: E402
from tests.helpers import TINY_OVERRIDES, launcher_env, write_synth_clips  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SMOKE = REPO / "launch/configs/smoke.yaml"

# (loss relative error below, gradient cosine above), per BatchNorm mode; measured values in the docstring.
BOUNDS = {"train": (2e-2, 0.7), "frozen": (1e-3, 0.97)}


def _cfg(*overrides: str):
    from pretrain.config import PretrainConfig

    return load_config(PretrainConfig, SMOKE, list(overrides))


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> str:
    return write_synth_clips(tmp_path_factory.mktemp("clips") / "synth")


def launch(args: list[str], timeout: float = 400) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus 2`` (2 gloo ranks) with ``args``; fails the test with the output on an error."""
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-12000:]}"
    return proc


def train(run_dir: Path, clips: str, *extra: str) -> dict[int, float]:
    """A 2-rank `deepspeed launch/pretrain.py` run of the tiny model; its loss per step."""
    launch(["launch/pretrain.py", "--config", str(SMOKE), *TINY_OVERRIDES, f"data.url={clips}",
            f"run_dir={run_dir}", "log_every=1", "checkpoint_every=0", "data.num_workers=1", *extra])  # fmt: skip
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m["loss"] for m in map(json.loads, lines)}


def model_states(run_dir: Path) -> dict:
    """The latest checkpoint's DeepSpeed model file (module weights and, under ZeRO 0, the optimizer)."""
    tag = (run_dir / "checkpoints/latest").read_text().strip()
    return torch.load(run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)


def one_step(out: Path, clips: str, cases: dict[str, list[str]], *extra: str) -> dict[str, dict]:
    """Run this file as the worker on 2 ranks; each case's saved result."""
    specs = [f"{name}:{';'.join(keys)}" for name, keys in cases.items()]
    launch([__file__, str(out), str(SMOKE), *specs, "--", *TINY_OVERRIDES, f"data.url={clips}", *extra])
    return {name: torch.load(out / name / "result.pt", weights_only=False) for name in cases}


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([grads[k].double().flatten() for k in sorted(grads)])


# ---------------------------------------------------------------------------------------------- unit tests


def test_bf16_is_a_deprecated_alias_of_bf16_weights():
    with pytest.warns(FutureWarning, match="'bf16' is deprecated") as caught:
        cfg = _cfg("precision=bf16")
    ours = [w for w in caught if "precision" in str(w.message)]
    assert len(ours) == 1  # one warning, not one per use
    text = str(ours[0].message)
    assert "precision=bf16_weights" in text and "precision=bf16_autocast" in text
    assert cfg.precision == "bf16_weights"  # downstream code (and the saved config.yaml) sees the new name
    assert build_ds_config(cfg, 2) == build_ds_config(_cfg("precision=bf16_weights"), 2)


def test_deepspeed_keys_per_precision():
    weights = build_ds_config(_cfg("precision=bf16_weights"), 2)
    assert weights["bf16"] == {"enabled": True} and weights["data_types"] == {"buffer_dtype": "bf16"}
    for precision in ("fp32", "bf16_autocast"):  # autocast is torch's: DeepSpeed keeps fp32 weights
        ds = build_ds_config(_cfg(f"precision={precision}"), 2)
        assert "bf16" not in ds and "data_types" not in ds and "fp16" not in ds
    with pytest.raises(ConfigError, match="precision") as err:
        _cfg("precision=fp16")
    assert "bf16_autocast" in str(err.value)


def test_a_json_bf16_under_autocast_names_both_new_values():
    cfg = _cfg("precision=bf16_autocast")
    with pytest.raises(ConfigError) as err:
        merge_user_config(build_ds_config(cfg, 2), {"bf16": {"enabled": True}}, cfg, 2, "ds.json")
    text = str(err.value)
    assert "'bf16.enabled'" in text and "(bf16_autocast)" in text, text
    assert "precision=bf16_weights" in text and "precision=fp32" in text, text
    assert merge_user_config(build_ds_config(cfg, 2), {"bf16": {"enabled": False}}, cfg, 2) is not None


def test_this_cpu_runs_bf16_matmuls():
    """The CPU path is real: bf16 autocast gives bf16 convolutions here (AVX512-BF16 on the test machines)."""
    conv = torch.nn.Conv2d(3, 4, 3)
    with torch.autocast("cpu", torch.bfloat16):
        y = conv(torch.randn(2, 3, 8, 8))
    assert y.dtype == torch.bfloat16 and conv.weight.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- launcher tests


@pytest.mark.integration
def test_bf16_autocast_matches_fp32_on_the_same_batch_and_weights(clips, tmp_path):
    cases = {}
    for bn, keys in (("train", []), ("frozen", ["freeze_bn_stats=true"])):
        cases[f"fp32-{bn}"] = ["precision=fp32", *keys]
        cases[f"autocast-{bn}"] = ["precision=bf16_autocast", *keys]
    results = one_step(tmp_path, clips, cases)
    for bn, (loss_tol, cosine_min) in BOUNDS.items():
        fp32, auto = results[f"fp32-{bn}"], results[f"autocast-{bn}"]
        assert fp32["init"].keys() == auto["init"].keys()
        assert all(torch.equal(fp32["init"][k], auto["init"][k]) for k in fp32["init"])  # the same weights
        assert torch.equal(fp32["images"], auto["images"])  # the same batch
        # Autocast was on for the model (bf16 embeddings), and only there: weights and gradients are fp32.
        assert (fp32["z_dtype"], auto["z_dtype"]) == (torch.float32, torch.bfloat16)
        for result in (fp32, auto):
            assert result["param_dtypes"] == {torch.float32} and result["grad_dtypes"] == {torch.float32}
        rel = abs(auto["loss"] - fp32["loss"]) / abs(fp32["loss"])
        cosine = torch.nn.functional.cosine_similarity(flat(auto["grads"]), flat(fp32["grads"]), dim=0).item()
        assert 0 < rel < loss_tol, (bn, auto["loss"], fp32["loss"])  # 0 would mean bf16 never ran
        assert cosine_min < cosine < 1 - 1e-9, (bn, cosine)


@pytest.mark.integration
def test_bf16_autocast_trains_with_fp32_weights_and_resumes_bit_exactly(clips, tmp_path):
    """6 steps in one go == 3 steps, stop, resume=auto, 3 more: same losses and the same weights, bit for bit."""
    full, split = tmp_path / "full", tmp_path / "split"
    reference = train(full, clips, "precision=bf16_autocast", "max_steps=6")
    assert sorted(reference) == [1, 2, 3, 4, 5, 6] and all(map(math.isfinite, reference.values()))
    saved = model_states(full)
    assert {v.dtype for v in saved["module"].values() if v.is_floating_point()} == {torch.float32}
    assert {s["exp_avg"].dtype for s in saved["optimizer"]["state"].values()} == {torch.float32}
    assert "precision: bf16_autocast" in (full / "config.yaml").read_text()

    assert train(split, clips, "precision=bf16_autocast", "max_steps=6", "stop_at_step=3") == {
        s: reference[s] for s in (1, 2, 3)
    }
    resumed = train(split, clips, "precision=bf16_autocast", "max_steps=6", "resume=auto")
    assert resumed == reference
    after = model_states(split)["module"]
    assert after.keys() == saved["module"].keys()
    assert all(torch.equal(after[k], saved["module"][k]) for k in after)


# ---------------------------------------------------------------------------------------------- the worker


def _worker(argv: list[str]) -> None:
    from deepspeed.utils import safe_get_full_grad

    from pretrain import distributed
    from pretrain.config import PretrainConfig
    from pretrain.engine import Trainer

    args = [a for a in argv if not a.startswith("--local")]
    split = args.index("--")
    out, config, specs, overrides = Path(args[0]), args[1], args[2:split], args[split + 1 :]
    for spec in specs:
        name, keys = spec.split(":", 1)
        case_dir = out / name
        cfg = load_config(
            PretrainConfig, config, [*overrides, *keys.split(";"), f"run_dir={case_dir}", "resume=never"]
        )
        trainer = Trainer(cfg)
        module = trainer.engine.module
        init = {k: v.detach().clone() for k, v in module.state_dict().items()}
        seen: dict[str, torch.dtype] = {}

        def record(module, inputs, output, seen=seen):  # returns None: the output is left as it is
            seen["z"] = output.dtype

        hook = module.register_forward_hook(record)
        batch = next(iter(trainer.batches))
        trainer.batches.close()
        result = trainer.forward_loss(batch)
        trainer.engine.backward(result.loss)
        hook.remove()
        grads = {n: safe_get_full_grad(p) for n, p in module.named_parameters()}  # collective under ZeRO 2
        loss = distributed.all_reduce_mean(result.loss.detach().reshape(1)).item()
        if distributed.is_main():
            torch.save(
                {
                    "loss": loss,
                    "init": init,
                    "images": batch.images.cpu(),
                    "grads": {n: g.detach().float().cpu() for n, g in grads.items()},
                    "z_dtype": seen["z"],
                    "param_dtypes": {p.dtype for p in module.parameters()},
                    "grad_dtypes": {g.dtype for g in grads.values()},
                },
                case_dir / "result.pt",
            )
        distributed.barrier()
        del trainer


if __name__ == "__main__":
    _worker(sys.argv[1:])

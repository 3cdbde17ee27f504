"""The GPU session script and its helpers, run on the CPU through the same code (device switched)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import launcher_env

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import data_wait  # noqa: E402


def test_data_wait_leaves_out_the_start_up_window_and_reports_mean_and_worst(tmp_path):
    lines = [
        {"step": 10, "images_per_s": 100.0, "data_wait_fraction": 0.50},  # pipeline start: left out
        {"step": 20, "images_per_s": 400.0, "data_wait_fraction": 0.01, "input_prep_fraction": 0.1},
        {"step": 30, "images_per_s": 600.0, "data_wait_fraction": 0.03},
        {"step": 40, "images_per_s": 500.0, "data_wait_fraction": 0.02},
        {"event": "checkpoint", "step": 40},  # not a logged window
    ]
    s = data_wait.summarise(lines, skip=1)
    assert s["windows"] == 3 and s["steps"] == (20, 40)
    assert s["images_per_s"] == 500.0
    assert s["wait_mean"] == pytest.approx(0.02) and s["wait_max"] == 0.03
    assert s["prep_mean"] == pytest.approx(0.1 / 3)
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(m) for m in lines[:1]))
    with pytest.raises(ValueError, match="need more than --skip 1"):
        data_wait.summarise(lines[:1])
    assert data_wait.main([str(path)]) == 1
    assert data_wait.main([str(tmp_path / "missing.jsonl")]) == 1


def test_bench_input_on_cuda_without_a_gpu_says_so():
    proc = subprocess.run(
        [sys.executable, "bench/bench_input.py", "--parts", "full", "--device", "cuda"],
        cwd=REPO, env=launcher_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "--device cuda: no CUDA device here" in proc.stderr


@pytest.mark.integration
def test_gpu_session_script_runs_every_part_on_cpu(tmp_path):
    """bench/gpu_session.sh with DEVICE=cpu: input benchmark, SynthFace, the paper config's trainer, data wait."""
    out = tmp_path / "out"
    env = launcher_env(
        DEVICE="cpu", OUT=str(out), CLIPS="2", STEPS="20", THREADS="1", IDENTITIES="2", PY=sys.executable,
        MODEL="model.arch=resnet18 model.width=8 model.projector_dims=[32,16] augment.resize=64 augment.crop=48 "
        "data.image_size=64 metrics.enabled=false",
    )  # fmt: skip
    proc = subprocess.run(
        ["bash", "bench/gpu_session.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    for part in ("bench_input", "synth", "pretrain_trainer", "data_wait_trainer", "pretrain_workers",
                 "data_wait_workers"):  # fmt: skip
        assert f"== {part}: exit 0" in proc.stdout, (part, proc.stdout[-3000:])
    bench = (out / "bench_input.log").read_text()
    assert "full input path on cpu" in bench and "torch/tv" in bench and "shapes on cpu" in bench
    losses = {}
    for finish in ("trainer", "workers"):
        cfg = yaml.safe_load((out / f"pretrain_{finish}_config.yaml").read_text())
        # the paper config, with only the session's overrides
        assert cfg["sampling"]["strategy"] == "timeaug" and cfg["faceswap"]["p"] == 0.4
        assert cfg["faceswap"]["start_step"] == 0  # the session measures steps with FaceSwap
        assert cfg["loss"]["fn_mode"] == "pick" and cfg["data"]["batch_clips"] == 2 and cfg["max_steps"] == 20
        assert cfg["data"]["finish_in"] == finish
        metrics = [json.loads(x) for x in (out / f"pretrain_{finish}_metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics if "data_wait_fraction" in m] == [10, 20]
        losses[finish] = [m["loss"] for m in metrics if "loss" in m]
        assert "20-20 (1 windows) |" in (out / f"data_wait_{finish}.log").read_text()
    assert losses["trainer"] == losses["workers"]  # the same batches whichever thread finished them
    assert not any(p.name.startswith("tmp") for p in out.iterdir())  # the work dir stayed outside OUT

"""The GPU session script and its helpers, run on the CPU through the same code (device switched)."""

from __future__ import annotations

import json
import os
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
    """bench/gpu_session.sh with DEVICE=cpu: input benchmark, SynthFace, the paper config's trainer, data wait,
    and (STEP_BENCH=1) bench_step.py's ceiling / trainer / original on one rank, bf16 autocast: the code a GPU
    session runs, with the device switched."""
    out = tmp_path / "out"
    env = launcher_env(
        DEVICE="cpu", OUT=str(out), CLIPS="2", STEPS="20", THREADS="1", IDENTITIES="2", PY=sys.executable,
        MODEL="model.arch=resnet18 model.width=8 model.projector_dims=[32,16] augment.resize=64 augment.crop=48 "
        "data.image_size=64 metrics.enabled=false", STEP_BENCH="1",
        STEP_ARGS="--quick --nproc 1 --original-workers 0 --steps 2 --identities 4 --set precision=bf16_autocast",
    )  # fmt: skip
    proc = subprocess.run(
        ["bash", "bench/gpu_session.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    for part in ("bench_input", "synth", "pretrain_trainer", "data_wait_trainer", "pretrain_workers",
                 "data_wait_workers", "bench_step"):  # fmt: skip
        assert f"== {part}: exit 0" in proc.stdout, (part, proc.stdout[-3000:])
    step = (out / "bench_step.log").read_text()
    assert "precision=bf16_autocast" in step and "1 CPU rank, (c) with 0 loader workers;" in step, step[
        -2000:
    ]
    row = next(line for line in step.splitlines() if line.startswith("| r18w16-64 | as set |"))
    ceiling, trainer, original = (float(x.replace(",", "")) for x in row.split("|")[3:6])
    assert min(ceiling, trainer, original) > 0, row
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


# ---------------------------------------------------------------- bench/bench_step.py, bench/bench_zero.py
import bench_compile_input  # noqa: E402
import bench_input_budget  # noqa: E402
import bench_step  # noqa: E402
import bench_zero  # noqa: E402


def test_bench_step_ratios_and_table_name_the_goals():
    r = bench_step.ratios({"ceiling": 400.0, "trainer": 380.0, "original": 50.0})
    assert r == {"trainer/ceiling": 0.95, "trainer/original": 7.6}
    assert bench_step.ratios({"trainer": 380.0}) == {"trainer/ceiling": None, "trainer/original": None}
    rows = [
        {"size": "r18w16-64", "variant": "fp32", "ceiling": 400.0, "trainer": 300.0, "original": 100.0},
        {"size": "r18w16-64", "variant": "compile", "ceiling": 400.0, "original": 100.0, "error": "no key"},
    ]
    table = bench_step.format_table(rows).splitlines()
    assert table[2] == "| r18w16-64 | fp32 | 400.0 | 300.0 | 100.0 | 0.75 (NOT met) | 3.00 (NOT met) |"
    assert table[3] == "| r18w16-64 | compile | 400.0 | unavailable: no key | 100.0 | - | - |"


def test_bench_step_device_defaults_and_the_callers_python_path(monkeypatch):
    cpu = bench_step.parse_args([])
    assert (cpu.device, cpu.nproc, cpu.original_workers) == ("cpu", 2, 1)  # 2 ranks; 1 worker + (c) = 2 cores
    gpu = bench_step.parse_args(["--device", "cuda"])
    cores = len(os.sched_getaffinity(0))
    assert (gpu.nproc, gpu.original_workers) == (1, max(1, cores - 1))
    assert bench_step.parse_args(["--device", "cuda", "--nproc", "4", "--original-workers", "6"]).nproc == 4
    with pytest.raises(SystemExit):
        bench_step.parse_args(["--original-workers", "-1"])
    assert "device=cuda" in bench_step.run_overrides("r50-112", 8, [], "cuda")
    monkeypatch.setenv(
        "PYTHONPATH", "/carried/site"
    )  # bench/gpu_session.sh's wheels: kept, after the checkout
    env = bench_step.bench_env("cuda")
    assert env["PYTHONPATH"] == f"{REPO}{os.pathsep}/carried/site" and env["DS_ACCELERATOR"] == "cuda"


def test_bench_step_repeat_spread_pairs_each_repeats_trainer_with_its_ceiling():
    line = bench_step.repeat_spread("r18w16-64", {"ceiling": [1000.0, 800.0], "trainer": [700.0, 640.0]})
    assert line == (
        "r18w16-64: images/s over repeats: ceiling 800.0-1,000.0, trainer 640.0-700.0; (b)/(a) by repeat: 0.70, 0.80"
    )
    with pytest.raises(SystemExit):
        bench_step.parse_args(["--repeats", "0"])


def test_bench_step_overrides_keep_the_size_and_put_set_last():
    o = bench_step.run_overrides("r50-112", 8, ["data.num_workers=2"])
    assert o[:5] == bench_step.SIZES["r50-112"] and "data.global_batch_clips=8" in o
    assert o[-1] == "data.num_workers=2"  # --set wins over the bench's own settings
    cfg = bench_step.load_cfg(o)
    assert (cfg.model.arch, cfg.augment.crop, cfg.data.num_workers, cfg.faceswap.start_step) == (
        "resnet50",
        112,
        2,
        0,
    )
    with pytest.raises(SystemExit):
        bench_step.parse_args(["--variants", "fp32,fp8"])


def test_bench_step_batch_rows_are_a_na_p_np_in_clip_order():
    import torch

    views = torch.arange(3 * 4).reshape(3, 4, 1, 1, 1).float()  # clip c, role r -> 4c + r
    desc = torch.arange(3 * 4).reshape(3, 4, 1).float()
    rows, d = bench_step.to_batch_rows(views, desc)
    assert rows.flatten().tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]
    assert d.flatten().tolist() == rows.flatten().tolist()


def test_original_style_sample_has_four_views_and_descriptors(tmp_path):
    """The per-sample pipeline of (c) on a real SynthFace corpus: PIL decode, dlib, NumPy FaceSwap, views."""
    subprocess.run(
        [sys.executable, "-m", "data_shards", "synth", "--out", str(tmp_path / "clips"), "--identities", "2",
         "--clips-per-identity", "2", "--seconds", "1", "--size", "128", "--seed", "0", "--no-progress"],
        cwd=REPO, env=launcher_env(), check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    clips = bench_step.load_clips(str(tmp_path / "clips"))
    for size, crop in (("r18w16-64", 64), ("r50-112", 112)):
        cfg = bench_step.load_cfg(bench_step.run_overrides(size, 4, ["faceswap.p=1.0"]))
        ds = bench_step.OriginalStyleClips(clips, cfg)
        views, desc = ds[0]
        assert views.shape == (4, 3, crop, crop) and views.dtype.is_floating_point
        assert views.min() >= 0.0 and views.max() <= 1.0 and views.std() > 0.01
        assert desc.shape == (4, 84) and desc.isfinite().all()
        assert 0 <= ds.no_face <= 4 + 2  # 4 frames + 2 donors (P and NP swapped at p = 1)


def test_bench_zero_parses_bench_train_and_computes_overhead():
    text = (
        "ranks=2 device=cpu arch=resnet18 width=16\n"
        "  ddp           200.0 images/s     80.0 ms/step  peak step memory/rank (MiB): 1.0, 1.0  ...\n"
        "  deepspeed     160.0 images/s    100.0 ms/step  peak step memory/rank (MiB): 1.0, 1.0  ...\n"
        "overhead ratio (DDP images/s / DeepSpeed images/s): 1.250\n"
    )
    cell = bench_zero.parse_bench_train(text)
    assert cell == {"ddp_ms": 80.0, "deepspeed_ms": 100.0}
    assert bench_zero.overhead_pct(80.0, 100.0) == pytest.approx(25.0)
    with pytest.raises(ValueError, match="deepspeed_ms"):
        bench_zero.parse_bench_train(text.splitlines()[1])
    row = bench_zero.format_table([{"size": "r18w16", "params": 812_345, "stage": 1, **cell}]).splitlines()[2]
    assert row == "| r18w16 | 0.8 M | 1 | 80.0 | 100.0 | +25.0% |"
    assert bench_zero.param_count("resnet18", 16) < bench_zero.param_count("resnet18", 64)


def test_bench_train_merges_a_deepspeed_json_and_runs_one_rank(tmp_path):
    """--ds-json reaches the engine (it reports the merged ZeRO settings); a key the project derives is one error
    before any rank starts; --nproc 1 runs (torchrun took ``--nproc`` for its own ambiguous option)."""
    import bench_train

    assert bench_train.worker_argv(["--nproc", "1", "--steps", "2", "--nproc=3", "--zero-stage", "2"]) == [
        "--steps", "2", "--zero-stage", "2"
    ]  # fmt: skip
    tuned = tmp_path / "tuned.json"
    tuned.write_text(json.dumps({"zero_optimization": {"overlap_comm": True, "reduce_bucket_size": 100000}}))
    cmd = [sys.executable, "bench/bench_train.py", "--nproc", "1", "--steps", "1", "--block", "1",
           "--batch-clips", "2", "--zero-stage", "2"]  # fmt: skip
    proc = subprocess.run(
        [*cmd, "--ds-json", str(tuned)], cwd=REPO, env=launcher_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "engine: zero_stage=2 overlap_comm=True reduce_bucket_size=100000" in proc.stdout, proc.stdout
    assert set(bench_zero.parse_bench_train(proc.stdout)) == {"ddp_ms", "deepspeed_ms"}

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 99}))
    proc = subprocess.run(
        [*cmd, "--ds-json", str(bad)], cwd=REPO, env=launcher_env(), capture_output=True, text=True
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: "), proc.stderr[-3000:]
    assert str(bad) in proc.stderr and "train_batch_size" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- scripts/dali_wheel.sh split / join
def _dali(tmp_path, *args, **env):
    return subprocess.run(
        ["bash", "scripts/dali_wheel.sh", *args], cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**launcher_env(), "DEST": str(tmp_path / "parts"), "PART_MIB": "1", **env},
    )  # fmt: skip


def test_dali_wheel_parts_round_trip_and_name_a_missing_or_bad_part(tmp_path):
    import hashlib
    import os

    wheel = tmp_path / "nvidia_dali_cuda130-0.0-py3-none-manylinux_2_28_x86_64.whl"
    data = os.urandom(2 * 2**20 + 12345)  # 3 parts of <= 1 MiB
    wheel.write_bytes(data)
    proc = _dali(tmp_path, "split", str(wheel))
    assert proc.returncode == 0, proc.stderr
    parts = sorted((tmp_path / "parts").glob("*.part*"))
    assert [p.name[-6:] for p in parts] == ["part00", "part01", "part02"]
    assert all(p.stat().st_size <= 2**20 for p in parts)
    sums = (tmp_path / "parts/SHA256SUMS").read_text()
    assert f"{hashlib.sha256(data).hexdigest()}  {wheel.name}" in sums.splitlines()

    proc = _dali(tmp_path, "join", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).read_bytes() == data

    middle = parts[1].read_bytes()
    parts[1].write_bytes(middle[:-1] + bytes([middle[-1] ^ 1]))  # one bit flipped
    proc = _dali(tmp_path, "join", str(tmp_path / "out2"))
    assert proc.returncode == 5 and f"part {parts[1]} is bad" in proc.stderr
    assert not (tmp_path / "out2" / wheel.name).exists()

    parts[1].unlink()
    proc = _dali(tmp_path, "join", str(tmp_path / "out3"))
    assert proc.returncode == 4 and f"part {parts[1]} missing" in proc.stderr

    (tmp_path / "parts/SHA256SUMS").unlink()
    proc = _dali(tmp_path, "join", str(tmp_path / "out4"))
    assert proc.returncode == 3 and "SHA256SUMS missing" in proc.stderr
    assert _dali(tmp_path, "split", str(tmp_path / "nope.whl")).returncode == 2


def test_bench_compile_input_sizes_parse_and_refuse_a_crop_larger_than_its_frame():
    assert bench_compile_input.parse_sizes("72:64,128:112") == [(72, 64), (128, 112)]
    for bad in ("72", "64:72", "a:b", "72:0"):
        with pytest.raises(SystemExit, match="FRAME:CROP"):
            bench_compile_input.parse_sizes(bad)


def test_input_budget_table_sums_the_stages_and_bounds_the_step():
    seconds = {"read": 0.2, "decode": 0.1, "faceswap": 0.3, "views": 0.2, "rest": 0.2}  # 1 s for 1000 images
    table = bench_input_budget.budget_table(seconds, 1000, ceiling=1000.0, cores=2)
    assert "| faceswap | 0.300 | 30% |" in table and "| host | 0.000 | 0% |" in table
    assert "**1.000**" in table
    assert "2.000 ms" in table and "at most 0.67 of the ceiling" in table  # c = 2 ms, i = 1 ms: 2 / 3


# ---------------------------------------------------------------- bench/bench_remote_store.py
def test_delay_proxy_passes_bytes_exactly_and_holds_each_response_burst():
    import socket
    import socketserver
    import threading
    import time

    import bench_remote_store

    class Echo(socketserver.BaseRequestHandler):
        def handle(self):
            while data := self.request.recv(65536):
                self.request.sendall(data[::-1])

    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            with bench_remote_store.DelayProxy(server.server_address[1], 0.05) as proxy:
                with socket.create_connection(("127.0.0.1", proxy.port)) as conn:
                    payload = bytes(range(256)) * 64
                    for _ in range(2):  # each request's response arrives one delay late
                        start = time.monotonic()
                        conn.sendall(payload)
                        got = b""
                        while len(got) < len(payload):
                            got += conn.recv(65536)
                        assert got == payload[::-1]
                        assert time.monotonic() - start >= 0.05
                        time.sleep(0.02)  # a pause: the next response is a new burst
        finally:
            server.shutdown()


def test_remote_store_summary_leaves_the_start_up_window_out():
    import bench_remote_store

    rows = [
        {
            "step": 5,
            "time": 100.0,
            "images_per_s": 10.0,
            "data_wait_fraction": 0.9,
            "input_prep_fraction": 0.0,
        },
        {
            "step": 10,
            "time": 101.0,
            "images_per_s": 300.0,
            "data_wait_fraction": 0.1,
            "input_prep_fraction": 0.2,
        },
        {
            "step": 15,
            "time": 103.0,
            "images_per_s": 500.0,
            "data_wait_fraction": 0.3,
            "input_prep_fraction": 0.4,
        },
    ]
    s = bench_remote_store.summarise(rows)
    assert s == pytest.approx(
        {"wall_s": 3.0, "images_per_s": 400.0, "data_wait": 0.2, "input_prep": 0.3, "steps": "6-15"}
    )
    with pytest.raises(ValueError, match="2 logging windows"):
        bench_remote_store.summarise(rows[:1])

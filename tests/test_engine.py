"""The training program end to end: config, DeepSpeed config, batches, launcher runs, exactness, resume.

Launcher tests start the real `deepspeed` / `torchrun` / `python launch/pretrain.py` commands on 2 CPU ranks
(gloo) over a tiny SynthFace clip dataset written once per module.

Exactness needs a model whose per-rank forward equals its slice of the single-process forward. BatchNorm in
training mode normalises with the statistics of the rows it sees, which differ between a rank's half batch and
the whole batch, so those runs use ``freeze_bn_stats=true`` (BatchNorm on running statistics). Everything
else - gather with gradient, MaskFN picks over the global batch, DeepSpeed's averaging, ZeRO-2 partitions -
is exercised as in training.
"""

from __future__ import annotations

import glob
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from common.configio import load_config
from common.errors import ConfigError
from pretrain.distributed import free_port
from pretrain.ds_config import build_ds_config, lr_factor
from tests.helpers import TINY_OVERRIDES, launcher_env

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SMOKE = REPO / "launch/configs/smoke.yaml"
TEST_OVERRIDES = TINY_OVERRIDES


def _launch(kind: str, script: str, args: list[str], timeout: float = 150) -> subprocess.CompletedProcess:
    port = str(free_port())
    if kind == "deepspeed":
        cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", port, script]
    elif kind == "torchrun":
        cmd = [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port, script]
    else:
        cmd = [sys.executable, script]
    proc = subprocess.run(
        cmd + args, cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, (
        f"{' '.join(cmd + args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-12000:]}"
    )
    # Each rank removed DeepSpeed's 64 MiB shared-memory all-reduce buffers on exit (they used to pile up).
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"), "leftover /dev/shm buffers"
    return proc


def _write_toy_clips(url: Path, clips: int, frames: int, size: int) -> None:
    """Fallback when SynthFace is unavailable: toy faces, one random look per clip."""
    from data_shards.write import ShardWriter, encode_jpeg
    from pretrain.faceswap import toy_faces

    gen = torch.Generator().manual_seed(0)
    with ShardWriter(str(url), kind="clips", split="pretrain", generator={"toy": True}, max_samples=4) as w:
        for c in range(clips):
            images, landmarks = toy_faces(frames, size, gen)
            meta = {
                "clip_id": f"toy-c{c:03d}",
                "identity_id": f"toy-i{c // 2:03d}",
                "fps": 25 / 6,
                "size": size,
                "source": "toy",
                "frame_indices": list(range(frames)),
                "landmarks": landmarks.tolist(),
                "labels": None,
            }
            w.write(meta["clip_id"], [encode_jpeg(im.permute(1, 2, 0).numpy()) for im in images], meta)


@pytest.fixture(scope="module")
def clips_url(tmp_path_factory) -> str:
    """16 clips of ~25 frames at 64 px in 4 shards (2 per rank)."""
    url = tmp_path_factory.mktemp("clips") / "synth"
    try:
        from data_shards.synth import SynthConfig, iter_clips
        from data_shards.write import ShardWriter

        cfg = SynthConfig(identities=8, clips_per_identity=2, seconds=6.0, size=64, seed=0)
        with ShardWriter(
            str(url), kind="clips", split="pretrain", generator={"synth": True}, max_samples=4
        ) as w:
            for clip in iter_clips(cfg):
                w.write_clip(clip)
    except ImportError:
        shutil.rmtree(url, ignore_errors=True)
        _write_toy_clips(url, clips=16, frames=25, size=64)
    return str(url)


def _cfg(url: str, run_dir: Path, *extra: str):
    from pretrain.config import PretrainConfig

    return load_config(
        PretrainConfig, SMOKE, [*TEST_OVERRIDES, f"data.url={url}", f"run_dir={run_dir}", *extra]
    )


# ---------------------------------------------------------------------------------------------- unit tests


def test_ds_config_and_lr_schedule(tmp_path):
    from pretrain.config import PretrainConfig

    cfg = load_config(
        PretrainConfig, SMOKE, ["zero_stage=2", "optim.grad_clip=1.0", "precision=bf16_weights"]
    )
    ds = build_ds_config(cfg, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == cfg.data.batch_clips
    assert ds["train_batch_size"] == 2 * cfg.data.batch_clips and ds["gradient_accumulation_steps"] == 1
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert (
        ds["optimizer"]["params"]["adam_w_mode"] is False
    )  # the paper's Adam, not DeepSpeed's AdamW default
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 1.0
    assert ds["bf16"] == {"enabled": True} and ds["data_types"]["buffer_dtype"] == "bf16"
    # Warmup: linear from lr/W to lr; then cosine to min ratio at the last step.
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(50, 100, 0, "constant") == 1.0


def test_config_errors_name_the_key_and_paper_configs_load():
    from pretrain.config import PretrainConfig

    for bad, key in [
        (["data.batch_clips=1"], "data.batch_clips"),
        (["optim.lr=0"], "optim.lr"),
        (["zero_stage=3"], "zero_stage"),
        (["optim.nope=1"], "optim.nope"),
        (["augment.channels_last=true"], "channels_last"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(PretrainConfig, SMOKE, bad)
    # The paper configs: 512 images per step on 1, 4 or 8 GPUs (data.global_batch_clips split per rank).
    from pretrain.config import resolve_global_batch

    for name, rows in (("sslfer", 4), ("simclr", 2)):
        for gpus in (1, 4, 8):
            cfg = load_config(PretrainConfig, REPO / f"launch/configs/{name}.yaml")
            assert resolve_global_batch(cfg, gpus).data.batch_clips * rows * gpus == 512
        assert cfg.model.arch == "resnet50" and cfg.augment.crop == 112 and cfg.precision == "bf16_weights"
        assert cfg.optim.lr == pytest.approx(3e-4) and cfg.optim.weight_decay == pytest.approx(1e-4)
        assert cfg.loss.temperature == pytest.approx(0.07) and cfg.model.channels_last
    assert load_config(PretrainConfig, REPO / "launch/configs/sslfer.yaml").loss.fn_lambda == pytest.approx(
        0.8
    )
    load_config(PretrainConfig, REPO / "launch/configs/demo.yaml")


def test_batches_layout_and_resume_position(clips_url, tmp_path):
    """Batch shapes/layout, and a restored pipeline continues with exactly the next batch."""
    from pretrain.pipelines.torch_pipeline import TorchBatchPipeline as BatchPipeline

    cfg = _cfg(clips_url, tmp_path, "data.num_workers=2")
    pipe = BatchPipeline(cfg, rank=0, world_size=1)
    steps = pipe.steps_in_epoch(0)
    assert steps == 16 // 2
    it = iter(pipe)
    first = [next(it) for _ in range(steps + 2)]  # crosses an epoch boundary
    pipe.close()
    b = cfg.data.batch_clips
    batch = first[0]
    assert batch.images.shape == (4 * b, 3, 48, 48) and batch.images.dtype == torch.float32
    assert batch.positive_index.tolist() == [2 * b, 2 * b + 1, 3 * b, 3 * b + 1, 0, 1, b, b + 1]
    assert batch.descriptors is not None and batch.descriptors.shape[0] == 4 * b
    assert not batch.swapped[: 2 * b].any()  # FaceSwap touches positives only
    assert [x.epoch for x in first] == [0] * steps + [1, 1]

    for k in (3, steps):  # mid-epoch and exactly at the epoch boundary
        pipe = BatchPipeline(cfg, rank=0, world_size=1)
        it = iter(pipe)
        for _ in range(k):
            next(it)
        state = pipe.state_dict()
        pipe.close()
        resumed = BatchPipeline(cfg, rank=0, world_size=1)
        resumed.load_state_dict(state)
        nxt = next(iter(resumed))
        resumed.close()
        assert (nxt.epoch, nxt.index) == (first[k].epoch, first[k].index)
        assert torch.equal(nxt.images, first[k].images)
    with pytest.raises(ValueError, match="same number of ranks"):
        BatchPipeline(cfg, rank=0, world_size=2).load_state_dict(state)


def test_cpu_and_device_decode_paths_agree(clips_url, tmp_path):
    from pretrain.pipelines.torch_pipeline import TorchBatchPipeline as BatchPipeline

    batches = []
    for decode in ("cpu", "device"):  # "device" on a CPU machine = decode in the training thread
        pipe = BatchPipeline(_cfg(clips_url, tmp_path, f"data.decode={decode}", "data.num_workers=0"), 0, 1)
        batches.append(next(iter(pipe)))
        pipe.close()
    assert torch.equal(batches[0].images, batches[1].images)


# ---------------------------------------------------------------------------------------------- launcher tests


def _reference(case_dir: Path, cfg):
    """Loss and gradients of one process on the concatenated batch of both ranks."""
    from pretrain.loss import donor_linked_groups, info_nce
    from pretrain.model import ContrastiveEncoder

    result = torch.load(case_dir / "result.pt", weights_only=False)
    world = result["world_size"]
    parts = [torch.load(case_dir / f"batch-rank{r}.pt", weights_only=False) for r in range(world)]
    n = parts[0]["images"].shape[0]
    images = torch.cat([p["images"] for p in parts])
    positives = torch.cat([p["positive_index"] + r * n for r, p in enumerate(parts)])
    groups = torch.cat([p["group_id"] * world + r for r, p in enumerate(parts)])
    descriptors = None if parts[0]["descriptors"] is None else torch.cat([p["descriptors"] for p in parts])
    drop = None
    if cfg.loss.drop_donor_columns:  # each rank's in-batch donors, as global group ids
        linked = [donor_linked_groups(p["positive_index"], p["group_id"], p["donor_row"]) for p in parts]
        drop = torch.cat([torch.where(g >= 0, g * world + r, g) for r, g in enumerate(linked)])
        assert int((drop >= 0).sum()) >= n, drop  # p=1: the pairs of a batch with 2 identities all linked
    model = ContrastiveEncoder(cfg.model)
    model.load_state_dict(result["init"])
    model.eval()  # = freeze_bn_stats: BatchNorm on running statistics (no dropout in the model)
    out = info_nce(
        model(images), positives, cfg.loss.temperature, fn_descriptors=descriptors, fn_lambda=cfg.loss.fn_lambda,
        fn_mode=cfg.loss.fn_mode, fn_threshold=cfg.loss.fn_threshold, group_id=groups, drop_group=drop,
    )  # fmt: skip
    out.loss.backward()
    return result, out.loss.item(), {k: p.grad for k, p in model.named_parameters()}


@pytest.mark.integration
def test_exactness_through_launcher(clips_url, tmp_path):
    """2 gloo ranks via `deepspeed`: gathered loss and averaged grads == one process on the whole batch."""
    _launch(
        "deepspeed",
        "tests/engine_exactness_worker.py",
        [str(tmp_path), str(SMOKE), *TEST_OVERRIDES, f"data.url={clips_url}"],
    )
    sys.path.insert(0, str(REPO / "tests"))
    from engine_exactness_worker import CASES

    for name, case in CASES.items():
        cfg = _cfg(clips_url, tmp_path, *case)
        result, ref_loss, ref_grads = _reference(tmp_path / name, cfg)
        assert abs(result["loss"] - ref_loss) < 1e-5, (name, result["loss"], ref_loss)
        worst = 0.0
        for pname, ref in ref_grads.items():
            got = result["grads"][pname]
            assert got is not None, (name, pname)
            worst = max(worst, (got.view_as(ref) - ref).abs().max().item())
        assert worst < 1e-5, (name, worst)


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.integration
def test_resume_and_sigterm_continue_bit_exactly(clips_url, tmp_path):
    """Uninterrupted (deepspeed) vs SIGTERM-interrupted (torchrun) + resume=auto (deepspeed): same losses."""
    common = [str(SMOKE.relative_to(REPO)), *TEST_OVERRIDES, f"data.url={clips_url}", "max_steps=12",
              "checkpoint_every=0", "log_every=1", "data.num_workers=1"]  # fmt: skip
    full, split = tmp_path / "full", tmp_path / "split"
    _launch("deepspeed", "launch/pretrain.py", ["--config", *common, f"run_dir={full}"])
    reference = {m["step"]: m["loss"] for m in _metrics(full)}
    assert sorted(reference) == list(range(1, 13))
    for item in ("config.yaml", "metrics.jsonl", "backbone.pt", "checkpoints/latest"):
        assert (full / item).exists(), item

    # Interrupt with SIGTERM once a few steps are done: a checkpoint must be written before exit.
    port = str(free_port())
    cmd = [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port, "launch/pretrain.py",
           "--config", *common, f"run_dir={split}"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=launcher_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 120
    while len(_metrics(split)) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=90)[0]
    latest = split / "checkpoints/latest"
    assert latest.exists(), output[-4000:]
    meta = json.loads((split / "checkpoints" / latest.read_text().strip() / "meta.json").read_text())
    stopped_at = meta["step"]
    assert 3 <= stopped_at < 12, output[-3000:]
    assert not (split / "backbone.pt").exists()
    assert [m["step"] for m in _metrics(split)] == list(range(1, stopped_at + 1))

    _launch("deepspeed", "launch/pretrain.py", ["--config", *common, f"run_dir={split}", "resume=auto"])
    resumed = _metrics(split)[stopped_at:]
    assert [m["step"] for m in resumed] == list(range(stopped_at + 1, 13))
    for m in resumed:
        assert m["loss"] == reference[m["step"]], (m["step"], m["loss"], reference[m["step"]])
    assert (split / "backbone.pt").exists()

    # A different world size is refused with a clear message.
    proc = subprocess.run(
        [sys.executable, "launch/pretrain.py", "--config", *common, f"run_dir={split}", "max_steps=14"],
        cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0 and "written by 2 ranks but this run has 1" in proc.stderr


@pytest.mark.integration
def test_single_process_run_writes_run_dir(clips_url, tmp_path):
    """`python launch/pretrain.py` (1 rank) and the backbone it writes loads for evaluation."""
    from pretrain.model import load_backbone

    run_dir = tmp_path / "one"
    _launch("python", "launch/pretrain.py", ["--config", str(SMOKE), *TEST_OVERRIDES, f"data.url={clips_url}",
                                             f"run_dir={run_dir}", "max_steps=2", "zero_stage=1"])  # fmt: skip
    lines = _metrics(run_dir)
    assert [m["step"] for m in lines] == [1, 2]
    assert all(
        np.isfinite(m["loss"]) and m["images_per_s"] > 0 and 0 <= m["data_wait_fraction"] <= 1 for m in lines
    )
    assert lines[0]["lr"] > 0
    backbone = load_backbone(run_dir / "backbone.pt")
    assert backbone(torch.zeros(1, 3, 48, 48)).shape == (1, 64)
    saved = (run_dir / "config.yaml").read_text()
    assert "batch_clips: 2" in saved and str(clips_url) in saved
    # A fresh run in the same run_dir: its metrics start at step 1; the earlier run's are kept aside.
    _launch("python", "launch/pretrain.py", ["--config", str(SMOKE), *TEST_OVERRIDES, f"data.url={clips_url}",
                                             f"run_dir={run_dir}", "max_steps=3", "resume=never"])  # fmt: skip
    assert [m["step"] for m in _metrics(run_dir)] == [1, 2, 3]
    kept = list(run_dir.glob("metrics.*.jsonl"))
    assert len(kept) == 1 and [json.loads(x)["step"] for x in kept[0].read_text().splitlines()] == [1, 2]


def test_remove_shm_buffers_deletes_only_this_ranks_files(tmp_path):
    from pretrain.distributed import remove_shm_buffers

    names = [
        "deepspeed_allreduce_buffer_0_127.0.0.1_29500_0",
        "deepspeed_allreduce_buffer_0_127.0.0.1_29500_1",  # another rank
        "deepspeed_allreduce_buffer_0_127.0.0.1_29501_0",  # another run
        "other_file_127.0.0.1_29500_0",
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_shm_buffers("127.0.0.1", "29500", 0, root=str(tmp_path))
    assert [Path(p).name for p in removed] == [names[0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])


def test_a_rank_that_aborts_in_native_code_prints_its_python_stack():
    """launch/pretrain.py enables faulthandler first: a C++ abort (gloo, NCCL, DALI) names the Python line."""
    code = (
        "import os, sys\n"
        "from launch.pretrain import main\n"
        "main(['--config', 'no-such-config.yaml'])\n"  # fails fast with exit code 2, after enabling faulthandler
        "def native_abort():\n"
        "    os.abort()\n"
        "native_abort()\n"
    )
    env = {k: v for k, v in launcher_env().items() if k != "PYTHONFAULTHANDLER"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == -signal.SIGABRT, proc.stderr[-2000:]
    assert "Fatal Python error: Aborted" in proc.stderr, proc.stderr[-2000:]
    assert "line 5 in native_abort" in proc.stderr, proc.stderr[-2000:]


def test_collapse_is_flagged_in_the_log_and_metrics(clips_url, tmp_path):
    """A run whose positive top-1 counts as 'at chance' (a line set absurdly high) is flagged after the window."""
    run_dir = tmp_path / "flat"
    proc = _launch("python", "launch/pretrain.py", ["--config", str(SMOKE), *TEST_OVERRIDES, f"data.url={clips_url}",
                   f"run_dir={run_dir}", "max_steps=4", "log_every=1", "collapse.window_steps=2",
                   "collapse.chance_factor=1000"])  # fmt: skip
    assert [m["collapse_suspected"] for m in _metrics(run_dir)] == [False, False, True, True]
    assert (
        "looks collapsed" in proc.stderr + proc.stdout and "faceswap.start_step" in proc.stderr + proc.stdout
    )

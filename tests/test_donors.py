"""FaceSwap donors drawn from a refreshed stream over the whole dataset (``faceswap.donors=stream``).

A SynthFace corpus of 12 identities in 12 shards (``python -m data_shards synth``, 64 px) read from disk.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from common.configio import load_config
from tests.helpers import TINY_OVERRIDES, launcher_env

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "launch/configs/smoke.yaml"
STREAM = ["faceswap.donors=stream", "faceswap.donor_bank_frames=8", "faceswap.donor_refresh_steps=2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("donors") / "clips"
    subprocess.run(
        [sys.executable, "-m", "data_shards", "synth", "--out", str(out), "--identities", "12",
         "--clips-per-identity", "2", "--seconds", "2", "--size", "64", "--seed", "0",
         "--shard-samples", "2", "--no-progress"],
        cwd=REPO, env=launcher_env(), check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return str(out)


def _cfg(url: str, *extra: str):
    from pretrain.config import PretrainConfig

    overrides = [*TINY_OVERRIDES, "data.num_workers=1", "data.prefetch=2", f"data.url={url}", *STREAM, *extra]
    return load_config(PretrainConfig, SMOKE, overrides)


def _take(pipe, n: int):
    it = iter(pipe)
    try:
        return [next(it) for _ in range(n)]
    finally:
        pipe.close()


def _stream(url: str, skips=None, seed: int = 0):
    from data_shards.read import iter_samples
    from pretrain.dataset import open_dataset
    from pretrain.pipelines.clips import as_clip, resilient_reader
    from pretrain.pipelines.donors import DonorStream

    counts: Counter[str] = Counter()
    skips = skips or (lambda reason, *message: counts.update([reason]))
    read = resilient_reader(iter_samples, skips)
    stream = DonorStream(open_dataset(url), 8, 64, lambda u: map(as_clip, read(u)), skips, seed, 2)
    return stream, counts


def test_default_is_stream():
    from pretrain.faceswap import FaceSwapConfig

    assert FaceSwapConfig().donors == "stream"
    for name in ("demo.yaml", "sslfer.yaml"):
        assert "donors: stream" in (REPO / "launch/configs" / name).read_text()


def test_donor_sets_are_seeded_refreshed_and_span_many_identities(corpus):
    a, _ = _stream(corpus)
    b, _ = _stream(corpus)  # another rank: the same sets, read on its own
    try:
        assert torch.equal(a.at(0).images, b.at(1).images)  # steps 0 and 1: one refresh
        sets = [a.at(2 * r) for r in range(6)]
        for r, s in enumerate(sets):
            other = b.at(2 * r + 1)
            assert torch.equal(s.images, other.images) and torch.equal(s.identity, other.identity)
            assert s.images.shape == (8, 3, 64, 64)
        assert not torch.equal(sets[0].images, sets[1].images)  # a refresh reads another set
        seen = set().union(*(s.identity.tolist() for s in sets))
        assert len(seen) >= 10  # of 12 identities, a bank in manifest order would hold 4
        assert all(len(set(s.identity.tolist())) >= 4 for s in sets)  # at least 4 shards per set
        c, _ = _stream(corpus, seed=1)
        assert not torch.equal(c.at(0).images, sets[0].images)  # seeded
        c.close()
    finally:
        a.close(), b.close()


def test_bad_shards_are_skipped_and_counted(corpus, tmp_path):
    import shutil

    url = tmp_path / "clips"
    shutil.copytree(corpus, url)
    shards = sorted(url.glob("*.tar"))
    for shard in shards[:3]:
        shard.write_bytes(b"not a tar" * 100)
    stream, counts = _stream(str(url))
    try:
        sets = [stream.at(2 * r) for r in range(6)]
    finally:
        stream.close()
    assert all(len(s.images) == 8 for s in sets)  # full sets from the good shards
    assert sum(counts.values()) >= 1, counts


@pytest.mark.parametrize("kind", ["torch", "dali", "torchvision"])
def test_pipelines_swap_with_stream_donors_never_of_a_batch_identity(corpus, kind):
    from pretrain.pipelines import make_batch_pipeline

    pipe = make_batch_pipeline(_cfg(corpus, "faceswap.p=1.0", f"data.pipeline={kind}"), 0, 1, "cpu")
    assert pipe.donor_stream is not None
    batches = _take(pipe, 3)
    half = batches[0].images.shape[0] // 2
    assert all(bool(b.swapped[half:].all()) for b in batches)  # p=1: every positive swapped
    # the donors the batched path drew, replayed: none of a batch identity
    if kind != "torchvision":
        from pretrain.faceswap import draw_donors

        for b in batches:
            bank, exclude = pipe.donors_at(b.epoch, b.index)
            allowed = ~torch.isin(bank.identity, b.identity)
            assert exclude and not bool(torch.isin(bank.identity[allowed], b.identity).any())
            gen = torch.Generator().manual_seed(0)
            idx = draw_donors(b.identity[half:], bank.identity, gen, allowed)
            assert not bool(torch.isin(bank.identity[idx], b.identity).any())


@pytest.mark.parametrize("kind", ["torch", "dali", "torchvision"])
def test_pipelines_name_in_batch_donor_rows_for_the_loss(corpus, kind):
    """donors=batch: each swapped positive names the batch row it was pasted onto (another identity, an
    unswapped anchor-half row or positive-half source); stream donors are not columns: -1 everywhere."""
    from pretrain.pipelines import make_batch_pipeline

    for donors, in_batch in (("batch", True), ("stream", False)):
        cfg = _cfg(corpus, "faceswap.p=1.0", f"data.pipeline={kind}", f"faceswap.donors={donors}")
        for b in _take(make_batch_pipeline(cfg, 0, 1, "cpu"), 2):
            half = b.images.shape[0] // 2
            assert b.donor_row is not None and b.donor_row.shape == b.swapped.shape
            assert bool((b.donor_row[:half] == -1).all())  # anchors are never swapped
            rows = b.donor_row[half:]
            if not in_batch:
                assert bool((rows == -1).all()), (donors, rows)
                continue
            assert bool((rows >= 0).all()) and bool(b.swapped[half:].all())
            assert bool((b.identity[rows] != b.identity[half:]).all())  # a donor of another identity


def test_batch_identities_are_never_drawn():
    from pretrain.faceswap import draw_donors

    gen = torch.Generator().manual_seed(0)
    pool = torch.arange(8) % 4
    allowed = ~torch.isin(pool, torch.tensor([0, 1]))
    for _ in range(50):
        idx = draw_donors(torch.tensor([0, 1, 0, 1]), pool, gen, allowed)
        assert set(pool[idx].tolist()) <= {2, 3}
    assert draw_donors(torch.tensor([2]), pool, gen, ~torch.isin(pool, torch.tensor([0, 1, 3]))).item() == -1


def test_resume_is_bit_exact_across_refreshes(corpus):
    """Batches 0..5 in one go vs 0..1, a checkpoint of the pipeline state, then 2..5 resumed: the same pixels
    (the donor sets of refreshes 0, 1, 2 re-read from (seed, step // refresh_steps) alone)."""
    from pretrain.pipelines import make_batch_pipeline

    cfg = _cfg(corpus, "faceswap.p=1.0")
    full = _take(make_batch_pipeline(cfg, 0, 1, "cpu"), 6)
    first = make_batch_pipeline(cfg, 0, 1, "cpu")
    _take(first, 2)
    resumed = make_batch_pipeline(cfg, 0, 1, "cpu")
    resumed.load_state_dict(first.state_dict())
    rest = _take(resumed, 4)
    for a, b in zip(full[2:], rest):
        assert torch.equal(a.images, b.images) and torch.equal(a.swapped, b.swapped)
    other = _take(make_batch_pipeline(_cfg(corpus, "faceswap.p=1.0", "faceswap.donors=bank"), 0, 1, "cpu"), 6)
    assert any(not torch.equal(a.images, b.images) for a, b in zip(full, other))  # the test can fail


def test_a_set_of_one_identity_is_counted_and_batches_use_their_own_rows(tmp_path):
    """No crash: a donor set with fewer than 2 people is counted and the batch falls back to in-batch donors
    (here one person only, so nothing is swapped)."""
    from pretrain.pipelines import make_batch_pipeline

    url = str(tmp_path / "clips")
    subprocess.run(
        [sys.executable, "-m", "data_shards", "synth", "--out", url, "--identities", "1",
         "--clips-per-identity", "4", "--seconds", "2", "--size", "64", "--seed", "0", "--no-progress"],
        cwd=REPO, env=launcher_env(), check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    pipe = make_batch_pipeline(_cfg(url, "faceswap.p=1.0"), 0, 1, "cpu")
    batches = _take(pipe, 2)
    assert pipe.donors_at(0, 0) == (None, False)
    assert pipe.skipped_counts()["donor_set_unusable"] >= 1
    assert not any(bool(b.swapped.any()) for b in batches)


@pytest.mark.integration
def test_training_resume_is_bit_exact_with_stream_donors(corpus, tmp_path):
    """2 deepspeed CPU ranks, donor set refreshed every 3 steps: 8 steps in one go vs a new run resumed from the
    step-4 checkpoint of the first to step 8 - the same loss at every step (refreshes at 6 crossed after resume).
    """
    import json

    from pretrain.distributed import free_port

    venv_bin = Path(sys.executable).parent
    common = ["--config", "launch/configs/smoke.yaml", *TINY_OVERRIDES, f"data.url={corpus}", *STREAM,
              "faceswap.donor_refresh_steps=3", "faceswap.p=1.0", "max_steps=8", "checkpoint_every=4",
              "checkpoint.keep_last=0", "log_every=1", "data.num_workers=1"]  # fmt: skip

    def launch(*extra: str) -> None:
        cmd = [str(venv_bin / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
               "launch/pretrain.py", *common, *extra]  # fmt: skip
        proc = subprocess.run(cmd, cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    def losses(run_dir: Path) -> dict[int, float]:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return {m["step"]: m["loss"] for m in map(json.loads, lines)}

    full, split = tmp_path / "full", tmp_path / "split"
    launch(f"run_dir={full}")
    reference = losses(full)
    assert sorted(reference) == list(range(1, 9))
    launch(f"run_dir={split}", f"resume={full / 'checkpoints' / 'step-00000004'}")
    resumed = losses(split)
    assert sorted(resumed) == [5, 6, 7, 8]
    assert all(resumed[s] == reference[s] for s in resumed), (resumed, reference)

"""The pretraining input pipelines (data.pipeline = torch | dali | torchvision) and their fault handling.

Tiny SynthFace clip shards (64 px) written with ShardWriter, then corrupted on purpose: a corrupt JPEG, invalid
JSON, missing and wrong-shaped landmarks, a one-frame clip, a truncated tar and a tar that is garbage from its
first byte. Store faults run against the real SeaweedFS store of ``tests/conftest.py``.
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from common.configio import load_config
from common.errors import ConfigError
from data_shards import store
from pretrain.augment import IMAGENET_STD
from tests.helpers import TINY_OVERRIDES, launcher_env

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "launch/configs/smoke.yaml"
PIPELINES = ("torch", "dali", "torchvision")
TINY = [*TINY_OVERRIDES, "data.num_workers=1", "data.prefetch=2"]


def _clips(identities: int = 4, clips_per_identity: int = 2):
    from data_shards.synth import SynthConfig, iter_clips

    cfg = SynthConfig(
        identities=identities, clips_per_identity=clips_per_identity, seconds=4.0, size=64, seed=0
    )
    return list(iter_clips(cfg))


def _write(url: str, clips, extra=(), max_samples: int = 2) -> None:
    """Clips (and extra (key, jpegs, meta) samples written after them) as a clips dataset at ``url``."""
    from data_shards.write import ShardWriter, encode_jpeg

    with ShardWriter(
        url, kind="clips", split="pretrain", generator={"test": True}, max_samples=max_samples
    ) as w:
        for clip in clips:
            w.write(clip.key, [encode_jpeg(f) for f in clip.frames], clip.meta)
        for key, jpegs, meta in extra:
            w.write(key, jpegs, meta)


def _cfg(url: str, *extra: str, run_dir: str = "runs/unused"):
    from pretrain.config import PretrainConfig

    return load_config(PretrainConfig, SMOKE, [*TINY, f"data.url={url}", f"run_dir={run_dir}", *extra])


@pytest.fixture(scope="module")
def clips():
    return _clips()


@pytest.fixture(scope="module")
def good_url(tmp_path_factory, clips) -> str:
    url = str(tmp_path_factory.mktemp("good") / "clips")
    _write(url, clips)
    return url


def _rewrite_member(shard: Path, name: str, data: bytes) -> None:
    members = []
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            members.append((m, data if m.name == name else tar.extractfile(m).read()))
    with tarfile.open(shard, "w") as tar:
        for m, payload in members:
            m.size = len(payload)
            tar.addfile(m, io.BytesIO(payload))


@pytest.fixture(scope="module")
def faulty_url(tmp_path_factory, clips) -> str:
    """Every fault the issue lists, in one dataset of 2-clip shards."""
    from data_shards.write import encode_jpeg

    root = tmp_path_factory.mktemp("faulty") / "clips"
    base = clips[0]
    jpegs = [encode_jpeg(f) for f in base.frames]
    meta = dict(base.meta)

    def variant(key: str, **changes):
        return key, list(jpegs), {**meta, "clip_id": key, **changes}

    corrupt = [jpegs[0]] + [j[: len(j) // 3] + b"\x00" * 64 for j in jpegs[1:]]  # all but frame 0 corrupt
    no_lm = {k: v for k, v in meta.items() if k != "landmarks"}
    extra = [
        ("bad-jpeg", corrupt, {**meta, "clip_id": "bad-jpeg"}),
        variant("bad-json"),
        ("no-lm", list(jpegs), {**no_lm, "clip_id": "no-lm"}),
        variant("bad-lm", landmarks=[[[0.0, 0.0]] * 5] * len(jpegs)),
        ("short", [jpegs[0]], {**meta, "clip_id": "short", "frame_indices": [0], "landmarks": meta["landmarks"][:1]}),
    ]  # fmt: skip
    _write(str(root), clips, extra)
    manifest = json.loads((root / "manifest.json").read_text())
    names = [s["name"] for s in manifest["shards"]]
    for name in names:  # invalid JSON inside a tar
        with tarfile.open(root / name) as tar:
            if "bad-json.json" in tar.getnames():
                _rewrite_member(root / name, "bad-json.json", b'{"clip_id": "bad-json", "landmarks": [')
    # A truncated tar (keeps its first sample) and a tar that is garbage from the first byte.
    truncated = root / names[1]
    truncated.write_bytes(truncated.read_bytes()[: int(truncated.stat().st_size * 0.6)])
    garbage = root / names[2]
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, garbage.stat().st_size, np.uint8).tobytes())
    return str(root)


# ------------------------------------------------------------------------------------------ one interface


def _take(pipe, n: int):
    it = iter(pipe)
    try:
        return [next(it) for _ in range(n)]
    finally:
        pipe.close()


def test_pipelines_share_layout_shapes_and_clips(good_url):
    """All three pipelines: same Batch fields, shapes, layout, and the same clips in the same batches."""
    from pretrain.pipelines import make_batch_pipeline

    out = {}
    for kind in PIPELINES:
        pipe = make_batch_pipeline(_cfg(good_url, f"data.pipeline={kind}"), 0, 1, "cpu")
        assert (
            type(pipe)
            .__name__.lower()
            .startswith({"torch": "torch", "dali": "dali", "torchvision": "torchvision"}[kind])
        )
        out[kind] = _take(pipe, 3)
    ref = out["torch"]
    for kind in PIPELINES:
        for a, b in zip(ref, out[kind]):
            assert b.images.shape == (8, 3, 48, 48) and b.images.dtype == torch.float32
            assert torch.equal(a.positive_index, b.positive_index) and torch.equal(a.group_id, b.group_id)
            assert torch.equal(a.identity, b.identity), kind  # same stream + sampler: same clips per batch
            assert b.descriptors is not None and b.descriptors.shape == a.descriptors.shape
            assert torch.allclose(a.descriptors, b.descriptors, atol=1e-4), kind  # same unswapped frames
            assert (b.epoch, b.index) == (a.epoch, a.index)
            assert not b.swapped[:4].any()  # FaceSwap touches positives only
            assert b.images.isfinite().all() and -3 < float(b.images.mean()) < 3
    # torch and DALI share the FaceSwap draw (same seeded generator), so the same rows are swapped.
    assert all(torch.equal(a.swapped, b.swapped) for a, b in zip(ref, out["dali"]))


class _HostReads:
    """Records, in the calling thread, every op that reads tensor values back to the host or sizes its output
    by them (``item``/``bool``/``int``, ``nonzero``, boolean indexing, ``unique``, ``tolist``): on a GPU each
    one stalls the stream until all queued work is done."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        aten = torch.ops.aten
        value_ops = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
                     aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
                     aten.repeat_interleave.Tensor}  # fmt: skip
        index_ops = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}
        seen = self.seen = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func in value_ops or (
                    func in index_ops and any(i is not None and i.dtype == torch.bool for i in args[1])
                ):
                    seen.append(str(func))
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def __enter__(self):
        import threading

        self._tolist, thread, seen = torch.Tensor.tolist, threading.current_thread(), self.seen
        original = self._tolist

        def tolist(t):  # a host read that does not dispatch on a CPU tensor
            if threading.current_thread() is thread:
                seen.append("tolist")
            return original(t)

        torch.Tensor.tolist = tolist
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        torch.Tensor.tolist = self._tolist


@pytest.mark.parametrize("shapes", ["static", "dynamic"])
def test_static_shapes_finish_batches_without_host_reads(good_url, shapes):
    """data.shapes=static (the CUDA default): FaceSwap, both view families and the descriptors never read a
    value back to the host, so a GPU stream never stalls; dynamic (the CPU default) does, and the detector
    sees it. Decoding (data.decode=cpu here) is left to the background threads."""
    from pretrain.pipelines import make_batch_pipeline

    # data.finish_in=trainer: the device side runs in the consuming thread, as on a GPU by default
    cfg = _cfg(
        good_url, f"data.shapes={shapes}", "data.decode=cpu", "faceswap.p=1.0", "data.finish_in=trainer"
    )
    pipe = make_batch_pipeline(cfg, 0, 1)
    assert not pipe.finish_in_workers
    assert pipe.static_shapes == (shapes == "static")
    it = iter(pipe)
    try:
        next(it)  # start-up (threads, first reads) outside the window
        with _HostReads() as reads:
            batches = [next(it) for _ in range(2)]
    finally:
        pipe.close()
    assert all(b.swapped[4:].all() for b in batches)  # every positive swapped: FaceSwap ran on every row
    if shapes == "static":
        assert reads.seen == []
    else:
        assert {"aten.nonzero.default", "tolist"} <= set(reads.seen), reads.seen


def test_batches_finished_by_workers_or_the_trainer_are_identical_and_resume_exactly(good_url):
    """data.finish_in: the same seeded batches whichever thread finishes them (on a GPU: a worker's own CUDA
    stream, handed over with an event, or the training stream)."""
    from pretrain.pipelines import make_batch_pipeline

    out = {}
    for where in ("workers", "trainer"):
        pipe = make_batch_pipeline(_cfg(good_url, f"data.finish_in={where}", "data.num_workers=2"), 0, 1)
        assert pipe.finish_in_workers == (where == "workers")
        out[where] = _take(pipe, 4)
    for a, b in zip(out["workers"], out["trainer"]):
        assert torch.equal(a.images, b.images) and torch.equal(a.swapped, b.swapped)
        assert a.ready is None and b.ready is None  # no CUDA event on a CPU device
    resumed = make_batch_pipeline(_cfg(good_url, "data.finish_in=trainer"), 0, 1)
    first = make_batch_pipeline(_cfg(good_url, "data.finish_in=workers"), 0, 1)
    _take(first, 2)
    resumed.load_state_dict(first.state_dict())
    assert all(torch.equal(a.images, b.images) for a, b in zip(_take(resumed, 2), out["workers"][2:]))


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_inline_input_makes_the_batches_threads_make(good_url, pipeline):
    """data.num_workers=0 (what auto picks where no core is spare) gives the same seeded batches as background
    workers, and reports its input as the training thread's own work (input_prep), not as waiting."""
    from pretrain.pipelines import make_batch_pipeline

    inline = _take(
        make_batch_pipeline(_cfg(good_url, f"data.pipeline={pipeline}", "data.num_workers=0"), 0, 1), 3
    )
    threads = _take(
        make_batch_pipeline(_cfg(good_url, f"data.pipeline={pipeline}", "data.num_workers=2"), 0, 1), 3
    )
    for a, b in zip(inline, threads):
        assert (a.epoch, a.index) == (b.epoch, b.index)
        assert torch.equal(a.images, b.images) and torch.equal(a.swapped, b.swapped)
    assert all(b.wait_s == 0.0 for b in inline)
    auto = make_batch_pipeline(_cfg(good_url, f"data.pipeline={pipeline}", "data.num_workers=auto"), 0, 1)
    assert isinstance(auto.data.num_workers, int)  # resolved for this host where the pipeline is built
    auto.close()


def test_static_and_dynamic_shapes_make_the_same_batches(good_url):
    from pretrain.pipelines import make_batch_pipeline

    out = {
        shapes: _take(make_batch_pipeline(_cfg(good_url, f"data.shapes={shapes}"), 0, 1), 3)
        for shapes in ("static", "dynamic")
    }
    for a, b in zip(out["static"], out["dynamic"]):
        assert torch.equal(a.swapped, b.swapped) and torch.equal(a.identity, b.identity)
        assert a.swapped.any()  # the test can fail: some rows are swapped
        torch.testing.assert_close(a.descriptors, b.descriptors, atol=1e-5, rtol=0)
        diff = (a.images - b.images).abs()
        # float rounding, and a swapped pixel that rounds to the other uint8 level (1/255 / std ~ 0.02)
        assert float(diff.max()) < 0.05 and float(diff.mean()) < 1e-4, (float(diff.max()), float(diff.mean()))


def test_torchvision_pipeline_resumes_exactly(good_url):
    from pretrain.pipelines import make_batch_pipeline

    cfg = _cfg(good_url, "data.pipeline=torchvision")
    full = _take(make_batch_pipeline(cfg, 0, 1, "cpu"), 4)
    pipe = make_batch_pipeline(cfg, 0, 1, "cpu")
    _take(pipe, 2)
    state = pipe.state_dict()
    resumed = make_batch_pipeline(cfg, 0, 1, "cpu")
    resumed.load_state_dict(state)
    after = _take(resumed, 2)
    for a, b in zip(full[2:], after):
        assert (a.epoch, a.index) == (b.epoch, b.index)
        assert torch.equal(a.images, b.images) and torch.equal(a.swapped, b.swapped)


def test_dali_pipeline_resumes_exactly(good_url):
    """Every random parameter of the DALI path is drawn by torch per batch: a resumed run is bit-identical."""
    from pretrain.pipelines import make_batch_pipeline

    cfg = _cfg(good_url, "data.pipeline=dali")
    full = _take(make_batch_pipeline(cfg, 0, 1, "cpu"), 3)
    pipe = make_batch_pipeline(cfg, 0, 1, "cpu")
    _take(pipe, 1)
    resumed = make_batch_pipeline(cfg, 0, 1, "cpu")
    resumed.load_state_dict(pipe.state_dict())
    after = _take(resumed, 2)
    for a, b in zip(full[1:], after):
        assert (a.epoch, a.index) == (b.epoch, b.index)
        assert torch.equal(a.identity, b.identity) and torch.equal(a.swapped, b.swapped)
        assert torch.equal(a.images, b.images)
        assert torch.equal(a.descriptors, b.descriptors)


@pytest.mark.parametrize(
    "settings, grey_level_bound",
    [
        # crops, flips, masks (and grayscale at 20%): float all the way in both paths; measured 0.03.
        (["augment.jitter_p=0", "augment.jitter_always_first_family=false", "augment.blur_p=0"], 0.5),
        # contrast alone: DALI pivots on mid-grey, shifted per sample onto the torch path's mean grey; 0.19, 0.03.
        (["augment.jitter_p=1", "augment.jitter_always_first_family=false", "augment.jitter=[0.0,0.4,0.0,0.0]",
          "augment.blur_p=0"], 0.5),
        # every jitter factor on every row, half of them grey, half blurred: same formulas (YIQ, same hue
        # direction, luma grey, same Gaussian, same contrast pivot); DALI clamps once after its twist where
        # the torch path clamps after each step (bright rows). Measured 3.3 and 0.7 on the two batches.
        (["augment.jitter_p=1", "augment.jitter=[0.4,0.4,0.4,0.1]", "augment.gray_p=0.5", "augment.blur_p=0.5"], 5.0),
    ],
)  # fmt: skip
def test_dali_and_torch_paths_draw_the_same_views(good_url, settings, grey_level_bound):
    """Same batch, same seeded draws, same views, whichever pipeline makes them."""
    from pretrain.pipelines import make_batch_pipeline

    torch_views = _take(make_batch_pipeline(_cfg(good_url, *settings), 0, 1, "cpu"), 2)
    dali_views = _take(make_batch_pipeline(_cfg(good_url, "data.pipeline=dali", *settings), 0, 1, "cpu"), 2)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for a, b in zip(torch_views, dali_views):
        grey_levels = ((a.images - b.images) * std * 255).abs()
        assert float(grey_levels.mean()) < grey_level_bound, float(grey_levels.mean())
    other = _take(
        make_batch_pipeline(_cfg(good_url, "data.pipeline=dali", "seed=1", *settings), 0, 1, "cpu"), 1
    )
    assert (
        float(((other[0].images - torch_views[0].images) * std * 255).abs().mean()) > 10
    )  # the test can fail


@pytest.mark.parametrize("kind", ["torch", "torchvision"])
def test_faceswap_probability_warms_up_with_the_batch_position(good_url, kind):
    """faceswap.p_warmup_steps: p ramps from 0 to faceswap.p over the first batches of the run, counted
    across epochs, in every pipeline; a resumed run gets the same probabilities (they depend on position)."""
    from pretrain.pipelines import make_batch_pipeline

    extra = ["data.batch_clips=4", "faceswap.p=1.0"]
    pipe = make_batch_pipeline(
        _cfg(good_url, f"data.pipeline={kind}", *extra, "faceswap.p_warmup_steps=4"), 0, 1, "cpu"
    )
    assert [pipe.cfg.faceswap.probability_at(s) for s in (0, 2, 4, 9)] == [0.0, 0.5, 1.0, 1.0]
    assert pipe.steps_in_epoch(0) < 4  # the ramp spans epochs

    def swap_rate(batch) -> float:  # among positives that have a donor of another identity in the batch
        half = batch.images.shape[0] // 2
        identity = batch.identity
        has_donor = (identity[half:, None] != identity[None, :]).any(dim=1)
        return (
            float(batch.swapped[half:][has_donor].float().mean()) if bool(has_donor.any()) else float("nan")
        )

    rates = [swap_rate(b) for b in _take(pipe, 7)]
    assert rates[0] == 0.0  # step 0: p = 0
    late = [r for r in rates[4:] if r == r]
    assert late and all(r == 1.0 for r in late)  # from step 4 on: p = 1, every such positive swapped
    assert any(r > 0.0 for r in rates[1:4] if r == r)  # on the ramp: some (the test can fail)
    plain = _take(make_batch_pipeline(_cfg(good_url, f"data.pipeline={kind}", *extra), 0, 1, "cpu"), 1)
    assert swap_rate(plain[0]) == 1.0  # no warm-up: p at once


def test_donor_bank_is_shared_seeded_and_resumes_exactly(good_url, clips):
    """faceswap.donors=bank: the same bank on every rank (one frame per clip, manifest order), donors of
    another identity drawn per batch from it (not from the batch), and resume stays bit-exact."""
    from pretrain.pipelines import make_batch_pipeline

    cfg = _cfg(good_url, "faceswap.donors=bank", "faceswap.p=1.0")
    rank0, rank1 = make_batch_pipeline(cfg, 0, 2, "cpu"), make_batch_pipeline(cfg, 1, 2, "cpu")
    assert rank0.donor_bank.images.shape == (len(clips), 3, 64, 64)
    assert torch.equal(rank0.donor_bank.images, rank1.donor_bank.images)
    assert len(set(rank0.donor_bank.identity.tolist())) == 4
    full = _take(make_batch_pipeline(cfg, 0, 1, "cpu"), 3)
    assert all(bool(b.swapped[4:].all()) for b in full)  # p=1: every positive has a donor of another identity
    from_batch = _take(
        make_batch_pipeline(_cfg(good_url, "faceswap.p=1.0", "faceswap.donors=batch"), 0, 1, "cpu"), 1
    )[0]
    assert not torch.equal(from_batch.images[4:], full[0].images[4:])  # other donors, other pixels
    assert torch.equal(from_batch.images[:4], full[0].images[:4])  # anchors untouched by the choice
    pipe = make_batch_pipeline(cfg, 0, 1, "cpu")
    _take(pipe, 1)
    resumed = make_batch_pipeline(cfg, 0, 1, "cpu")
    resumed.load_state_dict(pipe.state_dict())
    for a, b in zip(full[1:], _take(resumed, 2)):
        assert torch.equal(a.images, b.images) and torch.equal(a.swapped, b.swapped)
    tv = _take(make_batch_pipeline(_cfg(good_url, "faceswap.donors=bank", "faceswap.p=1.0",
                                       "data.pipeline=torchvision"), 0, 1, "cpu"), 1)[0]  # fmt: skip
    assert bool(tv.swapped[4:].all())


def test_donor_bank_of_one_identity_is_a_clear_error(tmp_path, clips):
    from pretrain.pipelines import make_batch_pipeline

    url = str(tmp_path / "one")
    _write(url, [c for c in clips if c.meta["identity_id"] == clips[0].meta["identity_id"]])
    with pytest.raises(ValueError, match="faceswap.donors=bank.*at least 2 identities"):
        make_batch_pipeline(_cfg(url, "faceswap.donors=bank", "data.batch_clips=2"), 0, 1, "cpu")


def test_config_rejects_an_unknown_pipeline(good_url):

    with pytest.raises(ConfigError, match="data.pipeline"):
        _cfg(good_url, "data.pipeline=opencv")


# ------------------------------------------------------------------------------------------ faults


@pytest.mark.parametrize("kind", PIPELINES)
def test_faulty_input_is_skipped_counted_and_never_fatal(faulty_url, kind, caplog):
    from pretrain.pipelines import make_batch_pipeline

    cfg = _cfg(faulty_url, f"data.pipeline={kind}", "sampling.short_clip_policy=skip")
    pipe = make_batch_pipeline(cfg, 0, 1, "cpu")
    steps = pipe.steps_in_epoch(0)
    with caplog.at_level(logging.WARNING):
        batches = _take(pipe, steps + 1)  # one whole epoch and into the next
    assert [b.epoch for b in batches] == [0] * steps + [1]
    assert all(b.images.shape == (8, 3, 48, 48) and b.images.isfinite().all() for b in batches)
    counts = pipe.skipped_counts()
    for reason in ("bad_json", "missing_landmarks", "bad_landmarks", "single_frame", "truncated_tar",
                   "unreadable_shard"):  # fmt: skip
        assert counts.get(reason, 0) >= 1, (reason, counts)
    assert counts == pipe.skipped()
    # Counts survive a checkpoint (they are cumulative for the exported metric).
    assert pipe.state_dict()["counters"].get("bad_landmarks", 0) >= 1
    # Rate-limited logging: at most SkipCounter.log_first (3) warnings per reason in this short run.
    per_reason: dict[str, int] = {}
    for rec in caplog.records:
        if rec.getMessage().startswith("skipped ("):
            reason = rec.getMessage()[len("skipped (") :].split(",")[0]
            per_reason[reason] = per_reason.get(reason, 0) + 1
    assert per_reason and max(per_reason.values()) <= 3, per_reason


@pytest.mark.parametrize("kind", PIPELINES)
def test_corrupt_jpeg_rows_are_replaced_and_counted(tmp_path, clips, kind):
    from data_shards.write import encode_jpeg
    from pretrain.pipelines import make_batch_pipeline

    # Every clip keeps only its first frame intact: every batch has corrupt rows.
    extra = []
    for clip in clips[:4]:
        jpegs = [encode_jpeg(f) for f in clip.frames]
        extra.append(
            (f"{clip.key}-x", [jpegs[0]] + [b"\xff\xd8\xff" + j[40:200] for j in jpegs[1:]], clip.meta)
        )
    url = str(tmp_path / "clips")
    _write(url, [], extra)
    pipe = make_batch_pipeline(_cfg(url, f"data.pipeline={kind}"), 0, 1, "cpu")
    batches = _take(pipe, 2)
    assert all(b.images.isfinite().all() for b in batches)
    assert pipe.skipped_counts()["corrupt_jpeg"] >= 4


def test_lost_store_mid_shard_is_retried_then_a_clear_error():
    from pretrain.pipelines.clips import resilient_reader

    store.configure(store.StoreConfig(retries=2, backoff_s=0.0))
    try:
        calls = []

        def flaky(url, handler):  # the connection drops after 2 samples on the first attempt
            calls.append(url)
            for i in range(5):
                if len(calls) == 1 and i == 2:
                    raise ConnectionResetError("reset by peer")
                yield {"i": i}

        slept = []
        assert [s["i"] for s in resilient_reader(flaky, None, slept.append)("s3://b/s.tar")] == [
            0,
            1,
            2,
            3,
            4,
        ]
        assert len(calls) == 2 and len(slept) == 1  # re-opened once, no sample repeated or dropped

        def down(url, handler):
            raise ConnectionRefusedError("refused")
            yield  # pragma: no cover

        with pytest.raises(store.StoreError, match="AWS_ENDPOINT_URL_S3"):
            list(resilient_reader(down, None, slept.append)("s3://b/s.tar"))

        def missing(url, handler):
            raise FileNotFoundError(url)
            yield  # pragma: no cover

        with pytest.raises(FileNotFoundError):  # not a connection problem: no retries
            list(resilient_reader(missing, None, slept.append)("s3://b/s.tar"))
    finally:
        store.configure(store.StoreConfig())


@pytest.fixture
def s3_clips(s3_env, clips, tmp_path):
    url = s3_env.url(f"test-input/{tmp_path.name}")
    _write(url, clips, max_samples=1)  # 8 shards: the inline reader opens a new one every clip
    return url


def test_wrong_credentials_fail_before_training(s3_env, s3_clips, monkeypatch):
    from pretrain.pipelines import make_batch_pipeline

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "0" * 32)
    with pytest.raises(store.StoreError, match="rejected the credentials") as err:
        make_batch_pipeline(_cfg(s3_clips), 0, 1, "cpu")
    assert "AWS_SECRET_ACCESS_KEY" in str(err.value)


def test_store_lost_mid_run_gives_a_clear_error(s3_env, s3_clips, monkeypatch):
    import socket

    from pretrain.pipelines import make_batch_pipeline

    pipe = make_batch_pipeline(_cfg(s3_clips, "data.num_workers=0", "data.shuffle_buffer=1"), 0, 1, "cpu")
    it = iter(pipe)
    try:
        next(it)  # reads from the real store
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")  # the store "goes away"
        store.configure(store.StoreConfig(retries=1, backoff_s=0.01))
        with pytest.raises(store.StoreError, match="AWS_ENDPOINT_URL_S3"):
            for _ in range(8):
                next(it)
    finally:
        pipe.close()
        store.configure(store.StoreConfig())


# ------------------------------------------------------------------------------------------ the engine


ENGINE_SCRIPT = r"""
import json, sys
from common.configio import load_config
from pretrain.config import PretrainConfig
from pretrain.engine import Trainer
url, root, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
for kind in ("torch", "dali", "torchvision"):
    cfg = load_config(PretrainConfig, "launch/configs/smoke.yaml", [*overrides, f"data.url={url}",
        f"run_dir={root}/{kind}", f"data.pipeline={kind}", "max_steps=2", "checkpoint_every=0", "log_every=1"])
    trainer = Trainer(cfg)
    status = trainer.train()
    lines = [json.loads(x) for x in open(f"{root}/{kind}/metrics.jsonl")]
    print(json.dumps({"kind": kind, "status": status, "steps": [x["step"] for x in lines],
                      "loss": [x["loss"] for x in lines], "skipped": lines[-1]["skipped"]}))
"""


def test_engine_trains_with_each_pipeline(good_url, tmp_path):
    env = launcher_env()
    proc = subprocess.run(
        [sys.executable, "-c", ENGINE_SCRIPT, good_url, str(tmp_path), json.dumps(TINY)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert [r["kind"] for r in runs] == list(PIPELINES)
    for r in runs:
        assert r["status"] == "finished" and r["steps"] == [1, 2], r
        assert all(np.isfinite(r["loss"])) and isinstance(r["skipped"], dict)
        assert (tmp_path / r["kind"] / "backbone.pt").exists()

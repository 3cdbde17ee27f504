"""Hostile shards through a real 2-rank `deepspeed` run: mutated copies of real SynthFace shards (the fuzz
mutations of tests/test_hostile_shards.py plus each attack a review found) sit in the dataset beside good ones.
The run must finish every step with finite losses and count what it skipped."""

from __future__ import annotations

import hashlib
import json
from itertools import islice

import numpy as np
import pytest

from tests.faults.conftest import metrics, record, run
from tests.test_hostile_shards import _bomb, _mutations, pax

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.fuzz]

FUZZED = 40


def _targeted(shard: bytes) -> list[bytes]:
    """The attacks of the review, each applied to a real shard."""
    first_json = shard.find(b'{"clip_id"')
    npy = shard.find(b"\x93NUMPY")
    jpeg = shard.find(b"\xff\xd8\xff")
    out = [
        pax({"size": "abc"}) + shard,  # PAX size that is not a number
        shard[:first_json] + b"[" * 4000 + shard[first_json + 4000 :],  # JSON nested deep (same length)
        shard.replace(b"(", b"(1000000000000, ", 1) if npy > 0 else shard,  # npy header claiming 10^12 frames
        shard.replace(b'"fps":', b'"fps":Infinity,"x":', 1),  # fps of Infinity
        shard.replace(b'"size":', b'"size":"abc","y":', 1),  # size of "abc"
    ]
    bomb = _bomb(20000, 20000)  # a JPEG frame that declares 20000 x 20000 pixels, same length as the original
    end = shard.find(b"\xff\xd9", jpeg) + 2
    if len(bomb) <= end - jpeg:
        out.append(shard[:jpeg] + bomb + b"\0" * (end - jpeg - len(bomb)) + shard[end:])
    header = bytearray(shard[:512])  # first member declares 2^60 bytes (base-256 size field)
    header[124:136] = b"\x80" + (1 << 60).to_bytes(11, "big")
    header[148:156] = b"        "
    header[148:155] = f"{sum(header):06o}\0".encode()
    out.append(bytes(header) + shard[512:])
    return out


def test_hostile_shards_never_stop_a_two_rank_run(clips_dir, tmp_path):
    data = tmp_path / "hostile"
    data.mkdir()
    manifest = json.loads((clips_dir / "manifest.json").read_text())
    good = manifest["shards"]
    for shard in good:
        (data / shard["name"]).write_bytes((clips_dir / shard["name"]).read_bytes())
    base = (clips_dir / good[0]["name"]).read_bytes()
    rng = np.random.default_rng(20261205)
    hostile = _targeted(base) + [mutated for _, mutated in islice(_mutations(base, rng), FUZZED)]
    entries = []
    for i, raw in enumerate(hostile):
        name = f"shard-{900000 + i:06d}.tar"
        (data / name).write_bytes(raw)
        entries.append(
            {**good[0], "name": name, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
        )
    manifest["shards"] = good + entries
    manifest["totals"]["shards"] = len(manifest["shards"])
    (data / "manifest.json").write_text(json.dumps(manifest))

    run_dir = tmp_path / "run"
    steps = 30  # more than an epoch of what is readable: every shard is visited
    rc, out = run("torchrun", [f"data.url={data}", f"run_dir={run_dir}", f"max_steps={steps}",
                                "checkpoint_every=0", "log_every=1"], timeout=300)  # fmt: skip
    assert rc == 0, out[-4000:]
    lines = metrics(run_dir)
    assert [m["step"] for m in lines] == list(range(1, steps + 1))
    assert all(np.isfinite(m["loss"]) for m in lines)
    skipped = lines[-1]["skipped"]
    assert sum(skipped.values()) >= len(hostile) // 2, skipped
    assert "Traceback" not in out
    record(f"hostile shards in a 2-rank run ({len(hostile)} mutated)", injected=len(hostile), skipped=skipped)

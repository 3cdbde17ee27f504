"""The object store (real SeaweedFS, dataset + checkpoint mirror) killed during training.

Restarted on the same port and data directory within the retry budget: reads and checkpoint uploads retry
(botocore's standard mode, jittered backoff; a shard cut mid-read is re-opened) and the run ends exactly as an
uninterrupted one. Left down: a clear error once the configured retries are spent, and the last checkpoint
intact. Secrets never reach the output or the run directory.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

from tests.faults.conftest import (
    REF_ARGS,
    assert_clean_error,
    checkpoint_step,
    data_position,
    finish,
    latest_checkpoint,
    metrics,
    record,
    start,
    wait_for_step,
)

pytestmark = [pytest.mark.faults, pytest.mark.integration]

# Retry policy of these runs: 20 retries per request, full jitter under caps of 0.2 s doubling to 1 s (each wait
# is random in [0, cap]: ~9 s of backoff expected, at least ~5 s with overwhelming probability; the sum of the
# caps is 18.4 s), so a restart of a few seconds is ridden out and a dead store ends the run in well under 90 s.
STORE_ARGS = ["store.retries=20", "store.backoff_s=0.2", "store.backoff_max_s=1.0", "store.connect_timeout_s=1.0",
              "store.read_timeout_s=5.0"]  # fmt: skip
RETRY_LINE = re.compile(r"retry \d+/\d+")


def _retries(out: str) -> dict[str, int]:
    """Retry log lines by kind: checkpoint-mirror uploads and shard/manifest reads."""
    lines = [line for line in out.splitlines() if RETRY_LINE.search(line)]
    uploads = sum("ckpt-" in line for line in lines)
    return {"retries_upload": uploads, "retries_read": len(lines) - uploads}


class Outage:
    """A private store (the session store serves other tests) that can be killed and restarted in place."""

    def __init__(self, data_dir: Path):
        from launch.services import ObjectStore, free_port

        self.store = ObjectStore(data_dir=data_dir, port=free_port()).start()

    def env(self) -> dict[str, str]:
        return self.store.env()

    def kill(self) -> float:
        t = time.monotonic()
        self.store.stop()
        return t

    def restart(self) -> None:
        from launch.services import ObjectStore

        old = self.store
        self.store = ObjectStore(
            data_dir=old.data_dir, port=old.port, access_key=old.access_key, secret_key=old.secret_key
        ).start()

    def upload(self, local: Path, prefix: str) -> str:
        client = self.store._client()
        files = sorted(p for p in local.iterdir() if p.name != "manifest.json")
        for path in [*files, local / "manifest.json"]:  # the manifest last: the commit point
            client.upload_file(str(path), self.store.bucket, f"{prefix}/{path.name}")
        return self.store.url(prefix)

    def keys(self, prefix: str) -> list[str]:
        listing = self.store._client().list_objects_v2(Bucket=self.store.bucket, Prefix=prefix)
        return sorted(o["Key"] for o in listing.get("Contents", []))


@pytest.fixture(scope="module")
def outage(tmp_path_factory):
    holder = Outage(tmp_path_factory.mktemp("outage-store"))
    yield holder
    holder.store.stop()


def _assert_no_secret(secret: str, out: str, run_dir: Path) -> None:
    assert secret not in out
    for path in run_dir.rglob("*"):
        if path.is_file() and path.suffix in ("", ".yaml", ".jsonl", ".json", ".txt", ".log"):
            assert secret.encode() not in path.read_bytes(), path


def test_store_restarted_mid_run_training_continues(outage, clips_dir, reference, tmp_path):
    data = outage.upload(clips_dir, "faults/data")
    mirror = outage.store.url("faults/ckpt-recover")
    run_dir = tmp_path / "run"
    args = [
        f"data.url={data}",
        f"checkpoint.mirror_url={mirror}",
        f"run_dir={run_dir}",
        *REF_ARGS,
        *STORE_ARGS,
    ]
    proc = start("python", args, SSLFER_INJECT_STEP_DELAY_S="0.5", **outage.env())
    wait_for_step(run_dir, 1, proc)
    down_at = outage.kill()
    time.sleep(2.0)
    outage.restart()
    down_s = time.monotonic() - down_at
    rc, out = finish(proc, timeout=180)
    assert rc == 0, out[-4000:]
    retries = len(RETRY_LINE.findall(out))
    assert retries >= 1, out[-4000:]  # the outage was felt (a read or an upload) and ridden out
    losses = {m["step"]: m["loss"] for m in metrics(run_dir)}
    assert losses == reference  # same clips, same order: nothing lost or repeated
    assert "faults/ckpt-recover/step-00000006/meta.json" in outage.keys("faults/ckpt-recover")
    _assert_no_secret(outage.store.secret_key, out, run_dir)
    record("object store restarted mid-run", store_down_s=round(down_s, 1), **_retries(out))


def _read_outage_run(outage, clips_dir, run_dir: Path, prefix: str, restart_after_s: float | None):
    """12 steps on 1 rank (8 per epoch), no mirror; the store dies at step 3, so the next epoch's shards are
    read while it is down. Returns (rc, output, seconds from the kill to the end, store down seconds)."""
    data = outage.upload(clips_dir, prefix)
    args = [f"data.url={data}", f"run_dir={run_dir}", "max_steps=12", "checkpoint_every=2", *STORE_ARGS]
    proc = start("python", args, SSLFER_INJECT_STEP_DELAY_S="0.5", **outage.env())
    down_s = None
    try:
        wait_for_step(run_dir, 3, proc)
        down_at = outage.kill()
        if restart_after_s is not None:
            time.sleep(restart_after_s)
            outage.restart()
            down_s = time.monotonic() - down_at
        rc, out = finish(proc, timeout=120)
        end_s = time.monotonic() - down_at
    finally:
        if outage.store.pid is None:
            outage.restart()  # for the next test and the fixture's teardown
    return rc, out, end_s, down_s


def test_store_restarted_while_reading_shards_training_continues(outage, clips_dir, tmp_path):
    run_dir = tmp_path / "run"
    rc, out, _, down_s = _read_outage_run(outage, clips_dir, run_dir, "faults/data3", restart_after_s=2.0)
    assert rc == 0, out[-4000:]
    counts = _retries(out)
    assert counts["retries_read"] >= 1, out[-4000:]
    lines = metrics(run_dir)
    assert [m["step"] for m in lines] == list(range(1, 13))
    # A retried shard continues after its last sample read: no repeats, nothing short, exact position.
    assert not {"short_shard_repeats", "unreadable_shard", "epoch_refill"} & set(lines[-1]["skipped"])
    assert checkpoint_step(run_dir) == 12
    position = data_position(run_dir)
    assert (position["epoch"], position["index"]) == (1, 4), position
    _assert_no_secret(outage.store.secret_key, out, run_dir)
    record("object store restarted while shards are read", store_down_s=round(down_s, 1), **counts)


def test_store_down_for_good_clear_error_checkpoint_intact(outage, clips_dir, tmp_path):
    run_dir = tmp_path / "run"
    rc, out, error_s, _ = _read_outage_run(outage, clips_dir, run_dir, "faults/data2", restart_after_s=None)
    line = assert_clean_error(rc, out)
    assert "AWS_ENDPOINT_URL_S3" in line or "127.0.0.1" in line, line
    assert error_s < 90, error_s
    counts = _retries(out)
    assert counts["retries_read"] >= 5, out[-3000:]
    saved = checkpoint_step(run_dir)
    assert saved is not None and saved >= 2
    meta = json.loads((latest_checkpoint(run_dir) / "meta.json").read_text())
    torch.load(latest_checkpoint(run_dir) / "rank-00000.pt", map_location="cpu", weights_only=False)
    assert meta["step"] == saved
    _assert_no_secret(outage.store.secret_key, out, run_dir)
    record("object store down for good", error_after_s=round(error_s, 1), **counts,
           last_checkpoint_step=saved, error=line[:140])  # fmt: skip

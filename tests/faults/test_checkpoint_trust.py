"""Checkpoints under attack and under a real full disk.

* A pickled payload in a checkpoint (our ``rank-*.pt`` or a DeepSpeed file) is refused and never runs.
* A byte flipped in a DeepSpeed file fails the sha256 check: refused by name; ``resume=auto`` falls back.
* ``latest`` naming a missing folder, a torn last ``metrics.jsonl`` line: ``resume=auto`` carries on.
* A step re-saved is never missing, whenever the save is killed; every file, folder and ``latest`` is fsynced.
* A real ENOSPC (a small tmpfs as the checkpoint folder; root needed, as here and in CI): the agreed failure
  path, the previous checkpoint intact and loadable, nothing half-published.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from pretrain import checkpoint as ckpt_mod
from pretrain.checkpoint import INDEX, Checkpointer, CheckpointError
from tests.faults.conftest import (
    REF_ARGS,
    assert_clean_error,
    checkpoint_step,
    metrics,
    record,
    run,
)

pytestmark = [pytest.mark.faults]
integration = pytest.mark.integration


# ---------------------------------------------------------------------------------------------- helpers
class _Payload:
    """Unpickling it runs ``touch MARKER``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _reindex(folder: Path, name: str) -> None:
    """What an attacker who can write the folder does after changing ``name``: fix its entry in the index."""
    index = json.loads((folder / INDEX).read_text())
    data = (folder / name).read_bytes()
    index["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / INDEX).write_text(json.dumps(index))


def _flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir)}


@pytest.fixture(scope="module")
def finished_run(clips_dir, tmp_path_factory) -> Path:
    """A finished 6-step run (checkpoints at steps 2, 4, 6); tests work on copies."""
    run_dir = tmp_path_factory.mktemp("trust-finished") / "run"
    rc, out = run("python", [f"data.url={clips_dir}", f"run_dir={run_dir}", *REF_ARGS])
    assert rc == 0, out[-4000:]
    return run_dir


def _copy_run(src: Path, clips_dir: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    return run_dir, [f"data.url={clips_dir}", f"run_dir={run_dir}", *REF_ARGS]


class _FakeCheckpointEngine:
    def save(self, state, path):
        torch.save(state, path)


class _FakeEngine:
    """What :meth:`Checkpointer.save` needs of a DeepSpeed engine, in one process: a model file per save."""

    def __init__(self, version: str):
        self.version = version
        self.checkpoint_engine = _FakeCheckpointEngine()

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        state = {"module": {"w": torch.arange(4.0)}, "version": self.version, **client_state}
        self.checkpoint_engine.save(state, str(folder / "mp_rank_00_model_states.pt"))


def _save(ckpt: Checkpointer, step: int, version: str = "v1") -> Path:
    return ckpt.save(_FakeEngine(version), step, 0, {"data": {"epoch": 0, "index": step}}, zero_stage=0)


def _version(path: Path) -> str:
    return torch.load(path / "mp_rank_00_model_states.pt", weights_only=True)["version"]


# ---------------------------------------------------------------------------------------------- pickles
@integration
def test_a_pickled_payload_in_a_checkpoint_is_refused_and_never_runs(finished_run, clips_dir, tmp_path):
    """rank-00000.pt (ours) and mp_rank_00_model_states.pt (DeepSpeed's) each hold an object whose unpickling
    would create a marker file: refused naming the file, with or without the index rewritten; no marker."""
    marker = tmp_path / "payload-ran"
    run_dir, args = _copy_run(finished_run, clips_dir, tmp_path)
    step6 = run_dir / "checkpoints/step-00000006"
    rank_file = step6 / "rank-00000.pt"
    state = torch.load(rank_file, map_location="cpu", weights_only=True)
    torch.save({**state, "data": {**state["data"], "extra": _Payload(marker)}}, rank_file)

    # Index left as it was: the size/sha256 check refuses the file before anything unpickles it.
    rc, out = run("python", [*args, f"resume={step6}"])
    assert_clean_error(rc, out, "rank-00000.pt", "checksums.json", "failed verification", "step-00000006")
    assert not marker.exists()

    # Index rewritten to match (someone who can write the folder): the restricted unpickler refuses it, and
    # resume=auto does not quietly take an older checkpoint of a tampered run.
    _reindex(step6, "rank-00000.pt")
    rc, out = run("python", [*args, "resume=auto"])
    assert_clean_error(rc, out, "rank-00000.pt", "refused", "Nothing from it was loaded")
    assert not marker.exists()

    # The same in DeepSpeed's own file, which DeepSpeed would unpickle without restriction: checked first.
    shutil.rmtree(run_dir)
    run_dir, args = _copy_run(finished_run, clips_dir, tmp_path)
    model_file = run_dir / "checkpoints/step-00000006/mp_rank_00_model_states.pt"
    state = torch.load(model_file, map_location="cpu", weights_only=False)  # our own test file
    torch.save({**state, "extra": _Payload(marker)}, model_file)
    _reindex(model_file.parent, model_file.name)
    rc, out = run("python", [*args, "resume=auto"])
    assert_clean_error(rc, out, "mp_rank_00_model_states.pt", "refused", "posix.system")
    assert not marker.exists()
    record("pickled payload in a checkpoint (ours, DeepSpeed's)", injected=3, payload_ran=False)


# ---------------------------------------------------------------------------------------------- integrity
@integration
def test_a_flipped_byte_in_a_deepspeed_file_is_refused_and_auto_falls_back(
    finished_run, clips_dir, reference, tmp_path
):
    run_dir, args = _copy_run(finished_run, clips_dir, tmp_path)
    step6 = run_dir / "checkpoints/step-00000006"
    _flip_byte(step6 / "mp_rank_00_model_states.pt")

    rc, out = run("python", [*args, f"resume={step6}"])
    assert_clean_error(
        rc, out, "mp_rank_00_model_states.pt", "does not match its sha256", "failed verification"
    )

    rc, out = run("python", [*args, "resume=auto"])
    assert rc == 0, out[-4000:]
    fallback = [line for line in out.splitlines() if "resume=auto: resuming from" in line]
    assert len(fallback) == 1, out[-4000:]
    assert "step-00000004" in fallback[0] and "mp_rank_00_model_states.pt" in fallback[0], fallback
    assert "sha256" in fallback[0], fallback
    assert _losses(run_dir) == reference  # steps 5-6 rerun from step 4: bit for bit
    # Step 6 was re-saved over the corrupt folder, and the new one verifies.
    assert Checkpointer(run_dir).resolve(str(step6)) == step6
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "latest", "step-00000002", "step-00000004", "step-00000006",
    ]  # fmt: skip
    record("byte flipped in a DeepSpeed checkpoint file", fell_back_to="step-00000004", resumed_equal=True)


@integration
def test_latest_naming_a_missing_folder_resumes_from_the_newest_complete_one(
    finished_run, clips_dir, reference, tmp_path
):
    run_dir, args = _copy_run(finished_run, clips_dir, tmp_path)
    shutil.rmtree(run_dir / "checkpoints/step-00000006")  # `latest` still names it
    rc, out = run("python", [*args, "resume=auto"])
    assert rc == 0, out[-4000:]
    assert "'latest' names step-00000006, which does not exist" in out, out[-4000:]
    assert "resumed from" in out and "step-00000004" in out
    assert _losses(run_dir) == reference
    assert checkpoint_step(run_dir) == 6
    record("latest names a missing folder", resumed_from="step-00000004", resumed_equal=True)


@integration
def test_a_torn_last_metrics_line_is_dropped_on_resume(clips_dir, reference, tmp_path):
    run_dir = tmp_path / "run"
    args = [f"data.url={clips_dir}", f"run_dir={run_dir}", *REF_ARGS]
    rc, out = run("python", [*args, "stop_at_step=4"])
    assert rc == 0, out[-4000:]
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "epoch": 0, "lo')  # killed while writing step 5's line
    rc, out = run("python", [*args, "resume=auto"])
    assert rc == 0, out[-4000:]
    assert "not complete JSON" in out, out[-4000:]
    assert _losses(run_dir) == reference  # every line parses again, steps 1..6 once each
    record("torn last metrics.jsonl line", resumed_equal=True)


def test_broken_latest_and_bad_checkpoints_fall_back_to_the_newest_verified_one(tmp_path, caplog):
    """Unit level, every way `latest` or a folder can be wrong: one log line naming the folder used and why."""
    ckpt = Checkpointer(tmp_path, keep_last=0)
    for step in (2, 4, 6):
        _save(ckpt, step)
    pointer = ckpt.dir / "latest"
    step4, step6 = ckpt.dir / "step-00000004", ckpt.dir / "step-00000006"

    def auto() -> tuple[str, str]:
        caplog.clear()
        path = Checkpointer(tmp_path).resolve("auto")
        lines = [r.getMessage() for r in caplog.records if "resume=auto" in r.getMessage()]
        assert len(lines) <= 1, lines
        return path.name, (lines[0] if lines else "")

    assert auto() == ("step-00000006", "")
    pointer.write_text("step-00000008")
    name, line = auto()
    assert name == "step-00000006" and "names step-00000008, which does not exist" in line
    pointer.write_text("../../../etc")
    name, line = auto()
    assert name == "step-00000006" and "not a checkpoint name" in line
    pointer.unlink()
    name, line = auto()
    assert name == "step-00000006" and "there is no 'latest'" in line

    pointer.write_text("step-00000006")
    (step6 / "stray.pt").write_bytes(b"x")  # a file the index does not list
    name, line = auto()
    assert name == "step-00000004" and "stray.pt is not listed" in line
    (step6 / "stray.pt").unlink()
    (step6 / INDEX).unlink()  # never finished, or written by an older version
    name, line = auto()
    assert name == "step-00000004" and f"{INDEX} is missing" in line
    _flip_byte(step4 / "rank-00000.pt", offset=-5)
    name, line = auto()
    assert name == "step-00000002" and "step-00000004 failed verification" in line and "rank-00000.pt" in line
    with open(ckpt.dir / "step-00000002/meta.json", "a") as f:
        f.write(" ")
    with pytest.raises(CheckpointError, match="no checkpoint .* passed verification"):
        auto()
    with pytest.raises(CheckpointError, match=r"rank-00000.pt has|rank-00000.pt does not match"):
        Checkpointer(tmp_path).resolve(str(step4))
    record("broken latest / unverifiable checkpoints (unit)", injected=7)


# ---------------------------------------------------------------------------------------------- publishing
class _Crash(BaseException):
    """A kill: nothing catches it."""


@contextmanager
def _crash_at(n: int, monkeypatch):
    """Make the n-th rename/replace/rmtree from now on 'kill' the process instead of running."""
    calls = {"count": 0, "crashed": False}

    def wrap(original):
        def mutation(*args, **kwargs):
            calls["count"] += 1
            if calls["count"] == n:
                calls["crashed"] = True
                raise _Crash
            return original(*args, **kwargs)

        return mutation

    with monkeypatch.context() as m:
        m.setattr(os, "rename", wrap(os.rename))
        m.setattr(os, "replace", wrap(os.replace))
        m.setattr(shutil, "rmtree", wrap(shutil.rmtree))
        yield calls


def test_resaving_a_step_never_leaves_it_missing(tmp_path, monkeypatch):
    """Step 4 saved again (a rerun from step 2): killed at every rename/delete of the save, a verified step 4,
    old or new, is always there for resume=auto; the next save tidies up."""
    origin = tmp_path / "origin"
    ckpt = Checkpointer(origin, keep_last=0)
    _save(ckpt, 2)
    _save(ckpt, 4, "old")
    crashes = 0
    for n in range(1, 100):
        run_dir = tmp_path / f"kill-{n}"
        shutil.copytree(origin, run_dir)
        with _crash_at(n, monkeypatch) as calls:
            try:
                _save(Checkpointer(run_dir, keep_last=0), 4, "new")
            except _Crash:
                pass
        if not calls["crashed"]:
            break
        crashes += 1
        found = Checkpointer(run_dir).resolve("auto")
        assert found is not None and found.name.startswith("step-00000004"), (n, found)
        assert _version(found) in ("old", "new"), n
        after = Checkpointer(run_dir, keep_last=0)
        _save(after, 6)
        names = sorted(p.name for p in after.dir.iterdir())
        assert names == ["latest", "step-00000002", "step-00000004", "step-00000006"], (n, names)
        assert after.resolve(str(after.dir / "step-00000004")) is not None
    assert crashes >= 4  # the partial clean-up, rename aside, rename into place, latest, delete of the old
    assert _version(_save(Checkpointer(origin, keep_last=0), 4, "new")) == "new"
    record("killed while re-saving a step (every rename/delete)", injected=crashes)


def test_publishing_fsyncs_every_file_the_folder_and_latest(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    ckpt = Checkpointer(tmp_path)
    _save(ckpt, 2)
    monkeypatch.setattr(os, "fsync", fsync)
    final = _save(ckpt, 4)
    partial = os.path.realpath(str(final) + ckpt_mod.PARTIAL_SUFFIX)
    folder, latest_tmp = os.path.realpath(ckpt.dir), os.path.realpath(ckpt.dir / "latest.tmp")
    for path in sorted(final.iterdir()):
        assert f"{partial}/{path.name}" in synced, path.name  # data and index, before the rename
    assert partial in synced  # the folder's entries
    assert latest_tmp in synced  # latest's content before it replaces the old one
    assert synced.count(folder) >= 2  # the rename into place, then latest's
    assert synced.index(latest_tmp) > synced.index(partial)
    record("power loss after publish (fsync of files, folders, latest)", fsynced=len(synced))


# ---------------------------------------------------------------------------------------------- real ENOSPC
@contextmanager
def _tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.fail(
            f"this test needs root (it mounts a {size} tmpfs to fill it for real): mount failed with "
            f"{proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}",
            pytrace=False,
        )
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(folder: Path, leave: int) -> Path:
    """Fill the file system of ``folder`` with one file, then give back ``leave`` bytes."""
    filler = folder / "filler"
    chunk = b"\0" * (1 << 20)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while True:
            os.write(fd, chunk)
    except OSError as err:
        assert err.errno == errno.ENOSPC, err
    finally:
        os.close(fd)
    os.truncate(filler, max(0, os.path.getsize(filler) - leave))
    return filler


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@integration
@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_a_really_full_disk_takes_the_agreed_failure_path(launcher, clips_dir, reference, tmp_path):
    """The checkpoint folder is a 16 MiB tmpfs, filled so that step 4's save hits ENOSPC (torch.save raises
    RuntimeError there, inside DeepSpeed): clean error on every rank, step 2 intact and verified, no partial
    folder; with space freed, resume=auto finishes the run (1 rank: bit-exactly)."""
    run_dir = tmp_path / "run"
    ckdir = run_dir / "checkpoints"
    args = [f"data.url={clips_dir}", f"run_dir={run_dir}", *REF_ARGS]
    with _tmpfs(ckdir, "16m"):
        rc, out = run(launcher, [*args, "stop_at_step=2"])
        assert rc == 0, out[-4000:]
        assert checkpoint_step(run_dir) == 2
        step2 = ckdir / "step-00000002"
        before = {p.name: p.read_bytes() for p in step2.iterdir()}
        filler = _fill(ckdir, leave=_folder_bytes(step2) // 2)

        rc, out = run(launcher, [*args, "resume=auto"])
        # Every rank took the same path and says the same (under torchrun a rank's line may follow another
        # rank's progress bar on the same line, so the messages are found anywhere in the output).
        errors = re.findall(r"error: (.*)", out)
        assert rc != 0 and errors, out[-4000:]
        if launcher == "python":
            assert_clean_error(rc, out, "writing checkpoint step-00000004", "No space left", "step-00000002")
        for line in errors:
            assert "writing checkpoint step-00000004" in line and "No space left on device" in line, line
            assert "still step-00000002" in line, line
        assert len(errors) == (1 if launcher == "python" else 2), (errors, out[-6000:])
        assert "]: Traceback" not in out, out[-6000:]  # no rank died on a traceback (torchrun prints its own)
        names = sorted(p.name for p in ckdir.iterdir() if not p.name.startswith("zero_to_"))
        assert names == ["filler", "latest", "step-00000002"], names  # nothing half-published
        assert {p.name: p.read_bytes() for p in step2.iterdir()} == before
        assert Checkpointer(run_dir).resolve("auto") == step2  # verified, loadable
        assert max(m["step"] for m in metrics(run_dir)) == 4

        filler.unlink()
        rc, out = run(launcher, [*args, "resume=auto"])
        assert rc == 0, out[-4000:]
        assert "step-00000002" in out
        assert checkpoint_step(run_dir) == 6
        assert [m["step"] for m in metrics(run_dir)] == list(range(1, 7))
        if launcher == "python":
            assert _losses(run_dir) == reference
    record(f"disk really full while checkpointing ({launcher}, tmpfs)", latest_after_failure="step-00000002",
           resumed=True)  # fmt: skip

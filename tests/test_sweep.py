"""Leftovers of killed runs are swept; what a live process uses, or a run just starting made, is left alone."""

from __future__ import annotations

import json
import mmap
import os
import socket
import time

from pretrain.sweep import sweep_file_sd, sweep_shm_buffers


def _age(path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_shm_buffers_of_dead_runs_go_live_and_fresh_ones_stay(tmp_path):
    dead = tmp_path / "deepspeed_allreduce_buffer_0_127.0.0.1_29500_0"
    live = tmp_path / "deepspeed_allreduce_buffer_0_127.0.0.1_29501_0"
    fresh = tmp_path / "deepspeed_allreduce_buffer_0_127.0.0.1_29502_0"
    other = tmp_path / "not_a_deepspeed_file"
    for path in (dead, live, fresh, other):
        path.write_bytes(b"\0" * 4096)
    for path in (dead, live, other):
        _age(path, 600)
    with open(live, "r+b") as handle, mmap.mmap(handle.fileno(), 4096):  # a live run maps its buffer
        removed = sweep_shm_buffers(str(tmp_path))
    assert removed == [str(dead)]
    assert live.exists() and fresh.exists() and other.exists()


def test_file_sd_targets_of_dead_runs_go(tmp_path):
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    alive_port = listening.getsockname()[1]
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    dead_port = probe.getsockname()[1]
    probe.close()
    try:
        files = {
            "dead": [f"127.0.0.1:{dead_port}"],
            "alive": [f"127.0.0.1:{dead_port}", f"127.0.0.1:{alive_port}"],
            "mine": [f"127.0.0.1:{dead_port}"],
        }
        for name, targets in files.items():
            (tmp_path / f"{name}.json").write_text(json.dumps([{"targets": targets, "labels": {}}]))
            _age(tmp_path / f"{name}.json", 600)
        (tmp_path / "junk.json").write_text("not json")
        _age(tmp_path / "junk.json", 600)
        removed = sweep_file_sd(tmp_path, keep=tmp_path / "mine.json")
    finally:
        listening.close()
    assert removed == [str(tmp_path / "dead.json")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alive.json", "junk.json", "mine.json"]

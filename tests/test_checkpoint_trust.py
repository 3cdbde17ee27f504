"""A checkpoint's per-rank state loads with weights_only=True: plain values and tensors only, no code runs."""

from __future__ import annotations

import os
import pickle
import random

import numpy as np
import pytest
import torch

from pretrain.checkpoint import CheckpointError, load_rank_state, rng_state, set_rng_state


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['SSLFER_TEST_MARKER']}",))


def test_a_pickled_payload_is_refused_and_does_not_run(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.setenv("SSLFER_TEST_MARKER", str(marker))
    evil = tmp_path / "rank-00000.pt"
    torch.save({"rng": rng_state(), "stream": _Payload()}, evil, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(CheckpointError, match="rank-00000.pt"):
        load_rank_state(evil)
    assert not marker.exists()


def test_rank_state_round_trips_every_rng_exactly(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    path = tmp_path / "rank-00000.pt"
    torch.save({"rng": rng_state(), "stream": {"epoch": 2, "consumed": [3, 4]}}, path)
    expected = (random.random(), np.random.random(), torch.rand(1).item())
    state = load_rank_state(path)
    set_rng_state(state.pop("rng"))
    assert (random.random(), np.random.random(), torch.rand(1).item()) == expected
    assert state == {"stream": {"epoch": 2, "consumed": [3, 4]}}


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path, caplog):
    from pretrain.engine import _truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n{"step": 3, "lo')
    _truncate_metrics(path, step=2)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.9}\n'
    assert "not complete JSON" in caplog.text

"""Two ranks through the real launchers: gathered loss and gradients equal the single-process ones, and the
flag/object collectives of ``pretrain.distributed`` give every rank the same answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]


def _command(launcher: str, port: int) -> list[str]:
    bin_dir = Path(sys.executable).parent
    worker = str(ROOT / "tests" / "dist_loss_worker.py")
    if launcher == "torchrun":
        return [str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(port), worker]  # fmt: skip
    # the deepspeed launcher: 2 CPU ranks; the worker ignores the --local_rank argument it adds
    return [str(bin_dir / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), worker]


@pytest.mark.integration
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_ranks_match_single_process(tmp_path, launcher):
    assert (Path(sys.executable).parent / launcher).exists(), f"{launcher} missing: run `make setup`"
    env = dict(
        os.environ, OUT_DIR=str(tmp_path), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu"
    )
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    cmd = _command(launcher, free_port())
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["world_size"] == 2
        assert result["agreement"] == {
            "any_rank_of_last": True,
            "any_rank_of_none": False,
            "all_ranks_of_last": False,
            "all_ranks_of_every": True,
            "gathered": ["rank0", "rank1"],
        }
        for name, case in result["cases"].items():
            assert case["grad_norm"] > 1e-3, name  # the check is not vacuous
            assert case["loss_diff"] < 1e-5, (name, case)
            assert case["grad_diff"] < 1e-5, (name, case)
        # in-batch donors dropped: 24 rows, 22 columns each minus the pick; 8 rows lose a donor clip's 4 rows
        assert result["cases"]["sslfer_pick_drop_donors"]["negatives_per_row"] == pytest.approx(
            (24 * 21 - 8 * 4) / 24
        )


def test_collectives_without_a_process_group_are_the_identity():
    from pretrain import distributed

    assert not distributed.is_initialized()
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    assert distributed.all_ranks(True) and not distributed.all_ranks(False)
    assert distributed.all_gather_object({"port": 1}) == [{"port": 1}]
    assert 0 < free_port() < 65536

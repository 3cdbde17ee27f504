"""Worker for tests/test_loss_distributed.py, started by torchrun: one rank of the distributed loss check.

Every rank builds the same tiny linear model and the same global batch (same seeds), keeps its own block,
computes DistributedInfoNCE, backpropagates and averages parameter gradients over ranks (as DeepSpeed does).
Each rank then recomputes the single-process loss on the concatenated batch and writes the differences to
``OUT_DIR/rank{r}.json``.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from pretrain import distributed
from pretrain.loss import DistributedInfoNCE, LossConfig, batch_layout, info_nce

CASES = [  # (name, layout, clips per rank, fn_mode, with descriptors, in-batch donors dropped)
    ("simclr", "simclr", 3, "none", False, False),
    ("sslfer_pick", "sslfer", 2, "pick", True, False),
    ("sslfer_threshold", "sslfer", 2, "threshold", True, False),
    ("sslfer_pick_drop_donors", "sslfer", 3, "pick", True, True),
]


def _donor_rows(rank: int, n: int) -> torch.Tensor:
    """Local donor rows: P of clip 0 <- A of clip (1 + rank) % 3, NP of clip 2 <- NA of clip 0 (3 clips)."""
    donor = torch.full((n,), -1)
    donor[6], donor[11] = (1 + rank) % 3, 3
    return donor


def _global_drop(world: int, n: int, positive: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """The single-process view, built row by row: a swapped row and its anchor drop the donor's global group."""
    drop = torch.full((world * n,), -1)
    for r in range(world):
        for local, donor in enumerate(_donor_rows(r, n).tolist()):
            if donor >= 0:
                row = r * n + local
                drop[row] = drop[int(positive[row])] = int(groups[r * n + donor])
    return drop


def run_case(layout: str, clips: int, fn_mode: str, with_desc: bool, drop_donors: bool) -> dict:
    rank, world = distributed.get_rank(), distributed.get_world_size()
    torch.manual_seed(1234)
    model = torch.nn.Linear(6, 5)
    pos_local, grp_local = batch_layout(clips, layout)
    n = pos_local.shape[0]
    x_all = torch.randn(world * n, 6)
    desc_all = torch.randn(world * n, 4) if with_desc else None
    cfg = LossConfig(temperature=0.1, fn_mode=fn_mode, fn_threshold=0.2, drop_donor_columns=drop_donors)

    block = slice(rank * n, (rank + 1) * n)
    out = DistributedInfoNCE(cfg)(
        model(x_all[block]),
        pos_local,
        grp_local,
        desc_all[block] if with_desc else None,
        _donor_rows(rank, n) if drop_donors else None,
    )
    out.loss.backward()
    grads = [distributed.all_reduce_mean(p.grad) for p in model.parameters()]
    loss_mean = distributed.all_reduce_mean(out.loss.detach())

    # Single-process reference on the concatenated batch (global row = rank * n + local row).
    ref_model = torch.nn.Linear(6, 5)
    ref_model.load_state_dict(model.state_dict())
    positive = torch.cat([pos_local + r * n for r in range(world)])
    groups = torch.cat([grp_local * world + r for r in range(world)])
    ref = info_nce(
        ref_model(x_all),
        positive,
        cfg.temperature,
        desc_all,
        cfg.fn_lambda,
        cfg.fn_mode,
        cfg.fn_threshold,
        groups,
        drop_group=_global_drop(world, n, positive, groups) if drop_donors else None,
    )
    ref.loss.backward()
    return {
        "loss_diff": abs(loss_mean.item() - ref.loss.item()),
        "loss": ref.loss.item(),
        "grad_diff": max((g - p.grad).abs().max().item() for g, p in zip(grads, ref_model.parameters())),
        "grad_norm": sum(p.grad.norm().item() for p in ref_model.parameters()),
        "negatives_per_row": ref.negatives_per_row.item(),
    }


def agreement(rank: int) -> dict:
    """The flag and object collectives the engine, checkpoints and metrics use: every rank sees the same answer."""
    return {
        "any_rank_of_last": distributed.any_rank(rank == distributed.get_world_size() - 1),
        "any_rank_of_none": distributed.any_rank(False),
        "all_ranks_of_last": distributed.all_ranks(rank == distributed.get_world_size() - 1),
        "all_ranks_of_every": distributed.all_ranks(True),
        "gathered": distributed.all_gather_object(f"rank{rank}"),
    }


def main() -> int:
    info = distributed.init_distributed("gloo")
    assert info.world_size > 1, "start this with torchrun --nproc_per_node 2"
    results = {name: run_case(*spec) for name, *spec in CASES}
    agreed = agreement(info.rank)
    with open(os.path.join(os.environ["OUT_DIR"], f"rank{info.rank}.json"), "w") as f:
        json.dump({"world_size": info.world_size, "cases": results, "agreement": agreed}, f)
    distributed.barrier()
    distributed.destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Worker for tests/test_engine.py::test_exactness_through_launcher (run under `deepspeed` or `torchrun`).

For each case (objective x ZeRO stage) it builds the real :class:`pretrain.engine.Trainer`, takes one batch,
runs forward + ``engine.backward`` (DeepSpeed averages the gradients over ranks) and saves, per rank, the batch
the rank saw and, on rank 0, the initial weights, the rank-averaged loss and every parameter's full gradient.
The test recomputes the loss and gradients in one process on the concatenated batch and compares.

    deepspeed --num_gpus 2 tests/engine_exactness_worker.py OUT_DIR CONFIG key=value...
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

CASES = {
    "simclr-zero0": ["sampling.strategy=simclr", "sampling.hard_negatives=false", "loss.fn_mode=none",
                     "faceswap.enabled=false", "zero_stage=0"],
    "sslfer-zero0": ["sampling.strategy=timeaug", "sampling.hard_negatives=true", "loss.fn_mode=pick",
                     "faceswap.enabled=true", "zero_stage=0"],
    "simclr-zero2": ["sampling.strategy=simclr", "sampling.hard_negatives=false", "loss.fn_mode=none",
                     "faceswap.enabled=false", "zero_stage=2"],
    "sslfer-zero2": ["sampling.strategy=timeaug", "sampling.hard_negatives=true", "loss.fn_mode=pick",
                     "faceswap.enabled=true", "zero_stage=2"],
    "sslfer-batch-donors-dropped": ["sampling.strategy=timeaug", "sampling.hard_negatives=true",
                                    "loss.fn_mode=pick", "faceswap.enabled=true", "faceswap.donors=batch",
                                    "faceswap.p=1.0", "faceswap.p_warmup_steps=0", "faceswap.start_step=0",
                                    "loss.drop_donor_columns=true", "zero_stage=0"],
}  # fmt: skip


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local")]
    out_dir, config, overrides = Path(args[0]), args[1], args[2:]
    from deepspeed.utils import safe_get_full_grad

    from common.configio import load_config
    from pretrain import distributed
    from pretrain.config import PretrainConfig
    from pretrain.engine import Trainer

    for name, case in CASES.items():
        case_dir = out_dir / name
        cfg = load_config(
            PretrainConfig,
            config,
            [*overrides, *case, f"run_dir={case_dir}", "resume=never", "freeze_bn_stats=true"],
        )
        trainer = Trainer(cfg)
        rank = distributed.get_rank()
        init = {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}
        batches = iter(trainer.batches)
        batch = next(batches)
        trainer.batches.close()
        out = trainer.forward_loss(batch)
        trainer.engine.backward(out.loss)
        grads = {}
        for pname, param in trainer.engine.module.named_parameters():
            grad = safe_get_full_grad(param)  # collective under ZeRO 2: every rank calls it
            grads[pname] = None if grad is None else grad.detach().float().cpu().clone()
        loss = distributed.all_reduce_mean(out.loss.detach().reshape(1)).item()
        torch.save(
            {
                "images": batch.images.detach().cpu(),
                "positive_index": batch.positive_index.cpu(),
                "group_id": batch.group_id.cpu(),
                "descriptors": None if batch.descriptors is None else batch.descriptors.cpu(),
                "donor_row": None if batch.donor_row is None else batch.donor_row.cpu(),
                "loss_local": out.loss.item(),
            },
            case_dir / f"batch-rank{rank}.pt",
        )
        if rank == 0:
            torch.save(
                {"init": init, "grads": grads, "loss": loss, "world_size": distributed.get_world_size()},
                case_dir / "result.pt",
            )
        distributed.barrier()
        del trainer


if __name__ == "__main__":
    main()

"""DeepSpeed config dict and LR schedule for a :class:`pretrain.config.PretrainConfig`.

Choices worth knowing:

* Optimizer ``Adam`` with ``torch_adam: true``: torch's own Adam, so no DeepSpeed op is JIT-compiled (+46 s on
  CPU). ``adam_w_mode`` is set explicitly: DeepSpeed's "Adam" otherwise means AdamW, while the paper used Adam
  with L2 weight decay (``optim.decoupled_weight_decay=false``).
* The LR schedule is NOT DeepSpeed's ``WarmupCosineLR``: that one multiplies the optimizer LR by ratios whose
  warmup starts at ``warmup_min_ratio`` and is log-shaped by default, and it reads ``total_num_steps`` from the
  JSON. We pass a torch ``LambdaLR`` (linear warmup from 0, then cosine to ``min_lr_ratio``) as a callable to
  ``deepspeed.initialize``; DeepSpeed steps it once per optimiser step and saves it in checkpoints.
  :func:`lr_factor` is the schedule, step ``s`` being the number of optimiser steps already taken.
* bf16: BatchNorm buffers follow the weights (``data_types.buffer_dtype``), otherwise the fp32 running stats
  meet bf16 activations and BatchNorm fails.
* ``gradient_accumulation_steps`` is 1: one step = one all-gathered contrastive batch; accumulating would change
  the negatives, not just the memory.
"""

from __future__ import annotations

import math
from typing import Any


def build_ds_config(cfg, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON (as a dict) for ``cfg`` on ``world_size`` ranks."""
    optim = cfg.optim
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_clips,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.data.batch_clips * world_size,
        "optimizer": {
            "type": "Adam",
            "params": {
                "lr": optim.lr,
                "betas": list(optim.betas),
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
                "torch_adam": True,
                "adam_w_mode": optim.decoupled_weight_decay,
            },
        },
        "zero_optimization": {"stage": int(cfg.zero_stage)},
        # torch's Adam is not on ZeRO's list of tested optimizers; it is the same update.
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": float(optim.grad_clip),
        "steps_per_print": 10**9,  # our own metrics.jsonl and progress bar report progress
        "wall_clock_breakdown": False,
    }
    if cfg.precision == "bf16":
        config["bf16"] = {"enabled": True}
        config["data_types"] = {"buffer_dtype": "bf16"}
    return config


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak LR before optimiser step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps  # linear; the first step already moves (factor 0 would waste it)
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_scheduler_factory(cfg, total_steps: int):
    """A callable ``optimizer -> LambdaLR`` for ``deepspeed.initialize(lr_scheduler=...)``."""
    import torch

    optim = cfg.optim

    def factor(step: int) -> float:
        return lr_factor(step, total_steps, optim.warmup_steps, optim.schedule, optim.min_lr_ratio)

    def build(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    return build

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
* ``precision=bf16_weights``: DeepSpeed's bf16 mode; BatchNorm buffers follow the weights
  (``data_types.buffer_dtype``), otherwise the fp32 running stats meet bf16 activations and BatchNorm fails.
  ``precision=bf16_autocast`` sets nothing here: the weights, gradients and optimizer stay fp32 and the engine
  runs the forward under ``torch.autocast`` (``pretrain/engine.py``).
* ``gradient_accumulation_steps`` is 1: one step = one all-gathered contrastive batch; accumulating would change
  the negatives, not just the memory.

A user's own DeepSpeed JSON (``launch/pretrain.py --deepspeed --deepspeed_config ds.json``, DeepSpeed's own
arguments) is merged over this dict by :func:`merge_user_config`: it may add anything (monitors ``csv_monitor``/
``tensorboard``/``wandb``, ``comms_logger``, ``flops_profiler``, ``wall_clock_breakdown``, ``steps_per_print``,
ZeRO tuning such as ``zero_optimization.overlap_comm``...), but a key the project derives from its own config
(:data:`DERIVED`) must agree with it (or be ``"auto"``): a different value is one :class:`ConfigError` naming
the JSON key and the config key to change. The merged dict is what ``deepspeed.initialize`` gets and what rank 0
saves as ``RUN_DIR/ds_config.json`` (:func:`save_resolved`). DeepSpeed's monitors record the LR themselves but not
the loss (the project computes it and calls ``engine.backward``): :func:`write_monitor_loss` adds
``Train/Samples/train_loss`` per optimiser step.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.configio import deep_merge
from common.errors import ConfigError


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
    if cfg.precision == "bf16_weights":
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


# ---------------------------------------------------------------- the user's DeepSpeed JSON

_ABSENT = object()  # the project sets nothing there and nothing may be set (e.g. a JSON "scheduler")


@dataclass(frozen=True)
class Derived:
    """A DeepSpeed key whose value comes from the project's config (or is fixed by its design)."""

    path: str  # dotted DeepSpeed JSON key, e.g. "zero_optimization.stage"
    config_key: str | None  # the project config key to change instead (None: fixed by design)
    value: Callable[[Any, int], Any]  # (cfg, world_size) -> the value; None: unset, anything goes
    fix: str  # what to do instead, for the error message ({value}: the JSON's value)
    shown: Callable[[Any, int], str] | None = None  # the config side as the message shows it (default: value)


def _fix_set(key: str) -> str:
    return f"set {key}={{value}} instead (in the YAML or as a key=value override)"


DERIVED: tuple[Derived, ...] = (
    Derived("train_micro_batch_size_per_gpu", "data.batch_clips", lambda c, w: c.data.batch_clips,
            _fix_set("data.batch_clips")),
    Derived("train_batch_size", "data.global_batch_clips", lambda c, w: c.data.batch_clips * w,
            "set data.global_batch_clips={value} instead (clips per step over all ranks; or data.batch_clips "
            "per rank)", lambda c, w: f"{c.data.batch_clips} clips x {w} ranks"),
    Derived("gradient_accumulation_steps", None, lambda c, w: 1,
            "one step is one all-gathered contrastive batch (accumulating would change the negatives); for a "
            "larger batch raise data.global_batch_clips or data.batch_clips"),
    Derived("optimizer.type", None, lambda c, w: "Adam",
            "drop the key (torch Adam; optim.decoupled_weight_decay=true makes it AdamW)"),
    Derived("optimizer.params.lr", "optim.lr", lambda c, w: c.optim.lr, _fix_set("optim.lr")),
    Derived("optimizer.params.betas", "optim.betas", lambda c, w: list(c.optim.betas), _fix_set("optim.betas")),
    Derived("optimizer.params.eps", "optim.eps", lambda c, w: c.optim.eps, _fix_set("optim.eps")),
    Derived("optimizer.params.weight_decay", "optim.weight_decay", lambda c, w: c.optim.weight_decay,
            _fix_set("optim.weight_decay")),
    Derived("optimizer.params.adam_w_mode", "optim.decoupled_weight_decay",
            lambda c, w: c.optim.decoupled_weight_decay, _fix_set("optim.decoupled_weight_decay")),
    Derived("optimizer.params.torch_adam", None, lambda c, w: True,
            "drop the key (torch's Adam: no DeepSpeed op to compile)"),
    Derived("scheduler", "optim.schedule", lambda c, w: _ABSENT,
            "drop the JSON scheduler and set optim.schedule, optim.warmup_steps and optim.min_lr_ratio",
            lambda c, w: f"{c.optim.schedule}, with optim.warmup_steps and optim.min_lr_ratio"),
    Derived("zero_optimization.stage", "zero_stage", lambda c, w: int(c.zero_stage), _fix_set("zero_stage")),
    Derived("zero_allow_untested_optimizer", None, lambda c, w: True,
            "drop the key (torch's Adam needs it under ZeRO)"),
    Derived("gradient_clipping", "optim.grad_clip", lambda c, w: float(c.optim.grad_clip),
            _fix_set("optim.grad_clip")),
    Derived("bf16.enabled", "precision", lambda c, w: c.precision == "bf16_weights",
            "set precision=bf16_weights (DeepSpeed bf16 weights) or precision=bf16_autocast (fp32 weights, bf16 "
            "autocast forward) or precision=fp32 instead", lambda c, w: c.precision),
    Derived("data_types.buffer_dtype", "precision",
            lambda c, w: "bf16" if c.precision == "bf16_weights" else None,
            "drop the key (BatchNorm buffers follow the weights)", lambda c, w: c.precision),
    Derived("fp16.enabled", "precision", lambda c, w: False,
            "fp16 is not offered (no loss scaling): set precision=bf16_autocast or precision=bf16_weights "
            "instead", lambda c, w: c.precision),
    Derived("amp.enabled", "precision", lambda c, w: False,
            "set precision=bf16_autocast (torch autocast) or precision=bf16_weights or precision=fp32 instead",
            lambda c, w: c.precision),
)  # fmt: skip


def load_user_config(path: str | Path) -> dict[str, Any]:
    """The user's DeepSpeed JSON file as a dict; a missing or malformed file is a :class:`ConfigError`."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"--deepspeed_config {path}: cannot read it ({err.strerror or err})") from err
    try:
        user = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--deepspeed_config {path}: not valid JSON ({err})") from err
    if not isinstance(user, dict):
        raise ConfigError(f"--deepspeed_config {path}: expected a JSON object, got {type(user).__name__}")
    return user


def _get(tree: dict, path: str) -> Any:
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def _put(tree: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, str) and isinstance(b, str):
        return a.lower() == b.lower()  # "bf16" / "BF16", "adam" / "Adam": DeepSpeed ignores the case
    return a == b


def merge_user_config(
    project: dict[str, Any], user: dict[str, Any], cfg, world_size: int, source: str = "the DeepSpeed JSON"
) -> dict[str, Any]:
    """``project`` (from :func:`build_ds_config`) with the user's JSON merged in.

    Keys the project does not derive are the user's (added, or replacing a project default such as
    ``wall_clock_breakdown`` or ``steps_per_print``). A derived key (:data:`DERIVED`) may repeat the project's
    value or say ``"auto"``; any other value is one :class:`ConfigError` listing every such key with the config
    key to change.
    """
    user = json.loads(json.dumps(user))  # a private copy: "auto" values are filled in below
    conflicts = []
    for item in DERIVED:
        theirs = _get(user, item.path)
        if theirs is _ABSENT:
            continue
        ours = item.value(cfg, world_size)
        if ours is None:  # not set by the project in this configuration (e.g. buffer_dtype under fp32)
            continue
        if theirs == "auto" and ours is not _ABSENT:
            _put(user, item.path, ours)
            continue
        if ours is not _ABSENT and _same(theirs, ours):
            continue
        theirs_text = json.dumps(theirs, separators=(",", ":"))
        if item.config_key is None:
            origin = f"the project fixes it at {json.dumps(ours)}"
        else:
            shown = item.shown(cfg, world_size) if item.shown else json.dumps(ours)
            origin = f"the project derives it from config key '{item.config_key}' ({shown})"
        fix = item.fix.replace("{value}", theirs_text)
        conflicts.append(f"'{item.path}' is {theirs_text} in the JSON, but {origin}: {fix}")
    if conflicts:
        what = f"{len(conflicts)} keys conflict" if len(conflicts) > 1 else "a key conflicts"
        them = "them" if len(conflicts) > 1 else "it"
        raise ConfigError(
            f"--deepspeed_config {source}: {what} with the project config (drop {them} from the JSON, or change "
            "the config key named): " + "; ".join(conflicts)
        )
    return deep_merge(project, user)


# The user's JSON for this process (launch/pretrain.py sets it from --deepspeed_config), like store.configure.
_user_config: tuple[dict[str, Any], str] | None = None


def use_user_config(user: dict[str, Any] | None, source: str = "the DeepSpeed JSON") -> None:
    """Set (or with None clear) the user's DeepSpeed JSON that :func:`resolve_ds_config` merges in."""
    global _user_config
    _user_config = None if user is None else (user, source)


def resolve_ds_config(cfg, world_size: int) -> dict[str, Any]:
    """The config ``deepspeed.initialize`` gets: :func:`build_ds_config` merged with the user's JSON, if any."""
    project = build_ds_config(cfg, world_size)
    if _user_config is None:
        return project
    user, source = _user_config
    return merge_user_config(project, user, cfg, world_size, source)


SECRET_KEY_PARTS = ("api_key", "token", "secret", "password")


def _redacted(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {
            k: "***" if any(p in str(k).lower() for p in SECRET_KEY_PARTS) and v else _redacted(v)
            for k, v in tree.items()
        }
    if isinstance(tree, list):
        return [_redacted(v) for v in tree]
    return tree


def save_resolved(ds_config: dict[str, Any], path: str | Path) -> Path:
    """Write the resolved DeepSpeed config (secrets such as a Comet ``api_key`` redacted) atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_redacted(ds_config), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def write_monitor_loss(engine, loss) -> None:
    """Feed DeepSpeed's monitors (csv_monitor, tensorboard, wandb, comet) the training loss of the step just taken.

    DeepSpeed records ``Train/Samples/lr`` itself in ``engine.step()`` but not the loss (the project computes it).
    Called on every rank after ``engine.step()``: the logged value is the mean over ranks (the ``loss`` of
    ``metrics.jsonl``), on DeepSpeed's x axis (samples seen). Without an enabled monitor it does nothing (no
    collective, no device sync).
    """
    monitor = getattr(engine, "monitor", None)
    if monitor is None or not monitor.enabled:
        return
    from pretrain import distributed

    mean = float(distributed.all_reduce_mean(loss.detach().float().reshape(1))[0])
    if distributed.is_main():
        monitor.write_events([("Train/Samples/train_loss", mean, engine.global_samples)])

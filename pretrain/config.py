"""``PretrainConfig``: one object describing a whole pretraining run.

Each component owns its section (``sampling``, ``augment``, ``loss``...); this module only adds the sections of
the training program itself (data input, optimiser, checkpoints) and the top-level run settings, and checks
the few rules that span sections. Load with ``common.configio.load_config(PretrainConfig, yaml, overrides)``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Literal

from common.errors import ConfigError
from data_shards.store import StoreConfig
from pretrain.augment import AugmentConfig
from pretrain.collapse import CollapseConfig
from pretrain.descriptors import DescriptorConfig
from pretrain.faceswap import FaceSwapConfig
from pretrain.loss import LossConfig
from pretrain.metrics import MetricsConfig
from pretrain.model import ModelConfig
from pretrain.sampling import SamplingConfig
from pretrain.stream import StreamConfig

Pipeline = Literal["torch", "dali", "torchvision"]
# "bf16" is the old name of bf16_weights: still read (one FutureWarning), rewritten to the new name on load.
Precision = Literal["fp32", "bf16_autocast", "bf16_weights", "bf16"]


@dataclass
class DataConfig(StreamConfig):
    """Input settings; the stream's own keys (url, shuffle_buffer, seed, resampled, equalize) live here too."""

    url: str = "runs/data/synth-pretrain"  # clips dataset: folder or s3://bucket/prefix holding manifest.json
    batch_clips: int = 8  # clips per rank per step; images per rank = 4x (SSL-FER) or 2x (SimCLR)
    global_batch_clips: int | None = None  # clips per step over ALL ranks; set: split evenly into batch_clips
    # Whole batches on a CPU device. auto: as many as cores the ranks' compute threads leave spare, at most 4;
    # where none is spare, one at idle priority (resolve_input_workers; 2 CPU ranks on 2 cores)
    num_workers: int | Literal["auto"] = "auto"  # input threads/rank; 0 inline; auto: spare cores, >= 1
    # Linux scheduling of the input threads. idle (SCHED_IDLE): they run only when the core has nothing else to
    # do, so they never preempt the rank's own step; auto: idle where they share cores with the compute.
    input_priority: Literal["auto", "normal", "idle"] = "auto"  # thread priority; auto: idle if no core spare
    prefetch: int = 4  # batches prepared ahead of the training step
    keep_freed_memory: bool = True  # CPU device: glibc reuses freed tensor memory (pretrain/allocator.py)
    decode: Literal["auto", "device", "cpu"] = "auto"  # where JPEGs are decoded (auto: nvjpeg on CUDA)
    image_size: int = 128  # frames are resized to this on decode if the shards hold another size
    # torch: batched torch decode+augment; dali: DALI decode/augment stages around torch FaceSwap;
    # torchvision: per-sample PIL + torchvision transforms in a DataLoader (baseline, fallback)
    pipeline: Pipeline = "torch"  # torch: batched ops; dali: DALI decode+augment; torchvision: DataLoader
    shapes: Literal["auto", "static", "dynamic"] = "auto"  # device work: static = no host syncs (auto: CUDA)
    finish_in: Literal["auto", "workers", "trainer"] = "auto"  # device work: auto = CPU workers, GPU trainer
    verify_sha256: bool = True  # check shard bytes against the manifest sha256 while streaming

    def validate(self) -> None:
        super().validate()
        if not self.url:
            raise ConfigError("config key 'data.url': give the clips dataset (folder or s3://bucket/prefix)")
        if self.batch_clips < 2:
            raise ConfigError(
                f"config key 'data.batch_clips': need >= 2 clips per rank (FaceSwap and negatives need "
                f"other clips), got {self.batch_clips}"
            )
        if (self.num_workers != "auto" and self.num_workers < 0) or self.prefetch < 1:
            raise ConfigError("config key 'data.num_workers' must be auto or >= 0, and 'data.prefetch' >= 1")
        if self.input_priority == "idle" and not hasattr(os, "SCHED_IDLE"):
            raise ConfigError(
                "config key 'data.input_priority': idle needs Linux's SCHED_IDLE, which this platform lacks; "
                "set data.input_priority=normal"
            )
        if self.image_size < 16:
            raise ConfigError(f"config key 'data.image_size': must be >= 16, got {self.image_size}")


@dataclass
class OptimConfig:
    lr: float = 3e-4  # peak learning rate (paper: Adam 3e-4)
    weight_decay: float = 1e-4  # L2 weight decay (AdamW-style when decoupled_weight_decay)
    betas: tuple[float, float] = (0.9, 0.999)  # Adam betas
    eps: float = 1e-8  # Adam epsilon
    decoupled_weight_decay: bool = False  # false: Adam with L2 decay (the paper); true: AdamW
    warmup_steps: int = 0  # linear warmup from 0 to lr
    schedule: Literal["cosine", "constant"] = "cosine"  # after warmup: cosine to min_lr_ratio*lr, or flat
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    grad_clip: float = 0.0  # global gradient-norm clip; 0 disables

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"config key 'optim.lr': must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.warmup_steps < 0:
            raise ConfigError(
                "config keys 'optim.weight_decay', 'optim.grad_clip', 'optim.warmup_steps' must be >= 0"
            )
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"config key 'optim.betas': each must be in [0, 1), got {self.betas}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"config key 'optim.min_lr_ratio': must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class CheckpointConfig:
    keep_last: int = 3  # checkpoints kept in run_dir/checkpoints (older ones deleted); 0 keeps all
    mirror_url: str | None = None  # also copy each published checkpoint to s3://bucket/prefix (or a folder)
    on_signal: bool = True  # SIGTERM/SIGINT: finish the step, save, exit

    def validate(self) -> None:
        if self.keep_last < 0:
            raise ConfigError(f"config key 'checkpoint.keep_last': must be >= 0, got {self.keep_last}")


@dataclass
class PretrainConfig:
    run_dir: str = "runs/pretrain"  # config.yaml, metrics.jsonl, checkpoints/, backbone.pt go here
    seed: int = 0  # seeds weights, frame choice and augmentation (with epoch, rank and batch index)
    epochs: int = 100  # passes over the dataset; ignored when max_steps is set
    max_steps: int | None = None  # total optimiser steps (sets the LR schedule length); null: from epochs
    stop_at_step: int | None = None  # end this invocation after this step with a checkpoint (job time limits)
    resume: str = "auto"  # auto: latest checkpoint in run_dir if any; never; or a checkpoint folder path
    log_every: int = 10  # steps between metrics.jsonl lines and progress updates
    checkpoint_every: int = 1000  # steps between checkpoints (0: only at the end and on signals)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available, else cpu
    precision: Precision = (  # fp32: exact; bf16_autocast: fp32 weights, grads and Adam, the forward under
        "fp32"  # bf16 autocast (CPU or CUDA); bf16_weights: DeepSpeed bf16 weights+buffers; bf16: old bf16_weights
    )
    zero_stage: Literal[0, 1, 2] = 0  # DeepSpeed ZeRO: 0 data parallel; 1 shards optimizer states; 2 + grads
    freeze_bn_stats: bool = False  # BatchNorm in eval mode (running stats): no coupling between batch rows
    # Seconds a collective may wait for a peer (process-group timeout): a rank that died or hangs ends the
    # others with an error after this long instead of a hang. Also bounds a checkpoint save's barriers.
    dist_timeout_s: float = 600.0  # collective timeout: ranks exit instead of hanging when a peer dies
    nan_policy: Literal["skip", "stop"] = "stop"  # non-finite loss: skip the step (counted) or stop
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    faceswap: FaceSwapConfig = field(default_factory=FaceSwapConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    descriptors: DescriptorConfig = field(default_factory=DescriptorConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=lambda: MetricsConfig(enabled=False))
    store: StoreConfig = field(default_factory=StoreConfig)  # object-store retries/backoff/timeouts
    collapse: CollapseConfig = field(
        default_factory=CollapseConfig
    )  # warn when positive top-1 stays at chance

    def validate(self) -> None:
        if not self.run_dir:
            raise ConfigError("config key 'run_dir': give an output folder")
        if self.seed < 0:
            raise ConfigError(f"config key 'seed': must be >= 0, got {self.seed}")
        if self.epochs < 1:
            raise ConfigError(f"config key 'epochs': must be >= 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"config key 'max_steps': must be >= 1 or null, got {self.max_steps}")
        if self.stop_at_step is not None and self.stop_at_step < 1:
            raise ConfigError(f"config key 'stop_at_step': must be >= 1 or null, got {self.stop_at_step}")
        if self.dist_timeout_s <= 0:
            raise ConfigError(f"config key 'dist_timeout_s': must be > 0 seconds, got {self.dist_timeout_s}")
        if self.log_every < 1 or self.checkpoint_every < 0:
            raise ConfigError("config keys 'log_every' must be >= 1 and 'checkpoint_every' >= 0")
        if not self.resume:
            raise ConfigError("config key 'resume': auto, never, or a checkpoint folder path")
        if self.precision == "bf16":
            warnings.warn(
                "config key 'precision': 'bf16' is deprecated; it means bf16_weights (DeepSpeed bf16 weights and "
                "buffers). Set precision=bf16_weights for that, or precision=bf16_autocast for fp32 weights with "
                "a bf16 autocast forward",
                FutureWarning,
                stacklevel=2,
            )
            self.precision = "bf16_weights"
        if self.optim.warmup_steps and self.max_steps and self.optim.warmup_steps >= self.max_steps:
            raise ConfigError(
                f"config key 'optim.warmup_steps': {self.optim.warmup_steps} is not below "
                f"max_steps={self.max_steps}"
            )
        if self.augment.channels_last != self.model.channels_last:
            raise ConfigError(
                "config keys 'augment.channels_last' and 'model.channels_last' must agree "
                "(views are produced in the memory format the model runs in)"
            )


AUTO_MAX_WORKERS = 4  # a cap, not a measured optimum: more threads per rank share one GIL


def spare_cores_per_rank(device: str, cores: int, local_ranks: int, compute_threads: int) -> int:
    """Cores per rank left once every local rank's compute threads have one each (a CUDA rank's compute is one
    feeding thread); 0 or less where the ranks already fill the cores."""
    per_rank = 1 if device.startswith("cuda") else max(1, compute_threads)
    return (cores - max(1, local_ranks) * per_rank) // max(1, local_ranks)


def auto_input_workers(device: str, cores: int, local_ranks: int, compute_threads: int) -> int:
    """``data.num_workers=auto``: one input thread per spare core, at most :data:`AUTO_MAX_WORKERS`; one where
    no core is spare, which ``data.input_priority=auto`` then runs at idle priority.

    Why one idle thread there: at normal priority an input thread takes turns with its own rank's compute and
    the switching costs more than it hides (on 2 CPU ranks on 2 cores the demo-size trainer ran 3-7% faster
    inline than with one normal thread); at idle priority it runs only in the gaps the step leaves (waits on
    the other rank, on the store) and never preempts it: -0.9, +6.0 and +6.5% against inline in 3 paired
    repeats of ``bench/bench_step.py --variants inline,threads1_normal`` (+5.4 to +7.6% in 4 of 5 pairs of two
    earlier runs), 8-14% more than one normal thread. Inline input (``data.num_workers=0``) would also put an
    object store's round trips into every step (``bench/bench_remote_store.py``)."""
    spare = spare_cores_per_rank(device, cores, local_ranks, compute_threads)
    return max(1, min(AUTO_MAX_WORKERS, spare))


def resolve_input_workers(cfg: PretrainConfig, device: str) -> PretrainConfig:
    """A copy of ``cfg`` with ``data.num_workers=auto`` and ``data.input_priority=auto`` replaced by what they
    mean on this host for a rank on ``device`` (``cpu``, ``cuda``): from the cores this process may run on,
    the ranks on this host (the launcher's ``LOCAL_WORLD_SIZE`` or ``LOCAL_SIZE``) and torch's intra-op
    threads; ``cfg`` itself when both are set."""
    from dataclasses import replace

    import torch

    data = cfg.data
    if data.num_workers != "auto" and data.input_priority != "auto":
        return cfg
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = torch.get_num_threads()
    spare = spare_cores_per_rank(str(device), cores, local_ranks, threads)
    workers = data.num_workers
    if workers == "auto":
        workers = auto_input_workers(str(device), cores, local_ranks, threads)
    priority = data.input_priority
    if priority == "auto":  # idle where the input threads share the compute's cores (and Linux has it)
        priority = "idle" if spare <= 0 and workers > 0 and hasattr(os, "SCHED_IDLE") else "normal"
    return replace(cfg, data=replace(data, num_workers=workers, input_priority=priority))


def resolve_global_batch(cfg: PretrainConfig, world_size: int) -> PretrainConfig:
    """A copy of ``cfg`` whose ``data.batch_clips`` is this rank's share of ``data.global_batch_clips``.

    The share must divide evenly by the world size. ``cfg`` is not modified; without ``global_batch_clips``
    it is returned as is.
    """
    from dataclasses import replace

    total = cfg.data.global_batch_clips
    if total is None:
        return cfg
    if total % world_size:
        lower, upper = total // world_size * world_size, -(-total // world_size) * world_size
        raise ConfigError(
            f"config key 'data.global_batch_clips': {total} clips cannot be split evenly over {world_size} ranks "
            f"(use {lower or world_size} or {upper}, or set data.batch_clips per rank instead)"
        )
    if total // world_size < 2:
        raise ConfigError(
            f"config key 'data.global_batch_clips': {total} clips over {world_size} ranks leaves fewer than 2 "
            "clips per rank (FaceSwap and negatives need other clips)"
        )
    return replace(cfg, data=replace(cfg.data, batch_clips=total // world_size))

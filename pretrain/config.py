"""``PretrainConfig``: one object describing a whole pretraining run.

Each component owns its section (``sampling``, ``augment``, ``loss``...); this module only adds the sections of
the training program itself (data input, optimiser, checkpoints) and the top-level run settings, and checks
the few rules that span sections. Load with ``common.configio.load_config(PretrainConfig, yaml, overrides)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from common.errors import ConfigError
from data_shards.store import StoreConfig
from pretrain.augment import AugmentConfig
from pretrain.descriptors import DescriptorConfig
from pretrain.faceswap import FaceSwapConfig
from pretrain.loss import LossConfig
from pretrain.metrics import MetricsConfig
from pretrain.model import ModelConfig
from pretrain.sampling import SamplingConfig
from pretrain.stream import StreamConfig


@dataclass
class DataConfig(StreamConfig):
    """Input settings; the stream's own keys (url, shuffle_buffer, seed, resampled, equalize) live here too."""

    url: str = "runs/data/synth-pretrain"  # clips dataset: folder or s3://bucket/prefix holding manifest.json
    batch_clips: int = 8  # clips per rank per step; images per rank = 4x (SSL-FER) or 2x (SimCLR)
    global_batch_clips: int | None = None  # clips per step over ALL ranks; set: split evenly into batch_clips
    num_workers: int = 2  # background threads preparing batches (whole batches on a CPU device); 0: inline
    prefetch: int = 4  # batches prepared ahead of the training step
    keep_freed_memory: bool = True  # CPU device: glibc reuses freed tensor memory (pretrain/allocator.py)
    decode: Literal["auto", "device", "cpu"] = "auto"  # where JPEGs are decoded (auto: nvjpeg on CUDA)
    image_size: int = 128  # frames are resized to this on decode if the shards hold another size
    # torch: batched torch decode+augment; dali: DALI decode/augment stages around torch FaceSwap;
    # torchvision: per-sample PIL + torchvision transforms in a DataLoader (baseline, fallback)
    pipeline: Literal["torch", "dali", "torchvision"] = "torch"
    shapes: Literal["auto", "static", "dynamic"] = "auto"  # device work: static = no host syncs (auto: CUDA)
    finish_in: Literal["auto", "workers", "trainer"] = "auto"  # device work: auto = CPU workers, GPU trainer

    def validate(self) -> None:
        super().validate()
        if not self.url:
            raise ConfigError("config key 'data.url': give the clips dataset (folder or s3://bucket/prefix)")
        if self.batch_clips < 2:
            raise ConfigError(
                f"config key 'data.batch_clips': need >= 2 clips per rank (FaceSwap and negatives need "
                f"other clips), got {self.batch_clips}"
            )
        if self.num_workers < 0 or self.prefetch < 1:
            raise ConfigError("config key 'data.num_workers' must be >= 0 and 'data.prefetch' >= 1")
        if self.image_size < 16:
            raise ConfigError(f"config key 'data.image_size': must be >= 16, got {self.image_size}")
        if self.finish_in not in ("auto", "workers", "trainer"):
            raise ConfigError(
                f"config key 'data.finish_in': must be auto, workers or trainer, got {self.finish_in!r}"
            )
        if self.shapes not in ("auto", "static", "dynamic"):
            raise ConfigError(
                f"config key 'data.shapes': must be auto, static or dynamic, got {self.shapes!r}"
            )
        if self.pipeline not in ("torch", "dali", "torchvision"):
            raise ConfigError(
                f"config key 'data.pipeline': must be torch, dali or torchvision, got {self.pipeline!r}"
            )


@dataclass
class FaceSwapSection(FaceSwapConfig):
    """``pretrain.faceswap.FaceSwapConfig`` plus the on/off switch of the training program."""

    enabled: bool = True  # FaceSwap on positives (P, NP) with probability faceswap.p
    # Where donors come from. batch: other rows of the same batch - every donor is then also a negative of the
    # anchor, so the swapped positive shares its hair/background/face shape with a negative; bank: a fixed
    # bank of frames read from the dataset when the pipeline starts (donors drawn per batch, seeded).
    donors: str = "batch"  # batch: other rows of the batch; bank: fixed dataset frames (pretrain/donors.py)
    donor_bank_frames: int = 256  # donor bank size (donors=bank): one frame per clip, manifest order
    p_warmup_steps: int = 0  # ramp faceswap.p linearly from 0 over this many batches (0: p from the start)

    def validate(self) -> None:

        super().validate()
        if self.donors not in ("batch", "bank"):
            raise ConfigError(f"config key 'faceswap.donors': must be batch or bank, got {self.donors!r}")
        if self.p_warmup_steps < 0:
            raise ConfigError(
                f"config key 'faceswap.p_warmup_steps': must be >= 0, got {self.p_warmup_steps}"
            )
        if self.donor_bank_frames < 2:
            raise ConfigError(
                f"config key 'faceswap.donor_bank_frames': need >= 2 frames, got {self.donor_bank_frames}"
            )


@dataclass
class OptimConfig:
    lr: float = 3e-4  # peak learning rate (paper: Adam 3e-4)
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    decoupled_weight_decay: bool = False  # false: Adam with L2 decay (the paper); true: AdamW
    warmup_steps: int = 0  # linear warmup from 0 to lr
    schedule: Literal["cosine", "constant"] = "cosine"  # after warmup: cosine to min_lr_ratio*lr, or flat
    min_lr_ratio: float = 0.0
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
    seed: int = 0
    epochs: int = 100  # passes over the dataset; ignored when max_steps is set
    max_steps: int | None = None  # total optimiser steps (sets the LR schedule length); null: from epochs
    stop_at_step: int | None = None  # end this invocation after this step with a checkpoint (job time limits)
    resume: str = "auto"  # auto: latest checkpoint in run_dir if any; never; or a checkpoint folder path
    log_every: int = 10  # steps between metrics.jsonl lines and progress updates
    checkpoint_every: int = 1000  # steps between checkpoints (0: only at the end and on signals)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    zero_stage: Literal[0, 1, 2] = 0
    freeze_bn_stats: bool = False  # BatchNorm in eval mode (running stats): no coupling between batch rows
    # Seconds a collective may wait for a peer (process-group timeout): a rank that died or hangs ends the
    # others with an error after this long instead of a hang. Also bounds a checkpoint save's barriers.
    dist_timeout_s: float = 600.0
    nan_policy: Literal["skip", "stop"] = (
        "stop"  # NaN/inf loss: skip the step (counted) or stop with an error
    )
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    faceswap: FaceSwapSection = field(default_factory=FaceSwapSection)
    loss: LossConfig = field(default_factory=LossConfig)
    descriptors: DescriptorConfig = field(default_factory=DescriptorConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=lambda: MetricsConfig(enabled=False))
    store: StoreConfig = field(default_factory=StoreConfig)  # object-store retries/backoff/timeouts

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
        if self.nan_policy not in ("skip", "stop"):
            raise ConfigError(f"config key 'nan_policy': must be skip or stop, got {self.nan_policy!r}")
        if self.log_every < 1 or self.checkpoint_every < 0:
            raise ConfigError("config keys 'log_every' must be >= 1 and 'checkpoint_every' >= 0")
        if self.resume not in ("auto", "never") and not self.resume:
            raise ConfigError("config key 'resume': auto, never, or a checkpoint folder path")
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

    @property
    def layout(self) -> str:
        """'quadruple' = [A, NA, P, NP] (hard negatives on), 'pair' = [A, P]."""
        return "quadruple" if getattr(self.sampling, "hard_negatives", False) else "pair"


def resolve_global_batch(cfg: PretrainConfig, world_size: int) -> None:
    """``data.global_batch_clips`` -> ``data.batch_clips`` per rank; it must divide evenly by the world size."""
    total = cfg.data.global_batch_clips
    if total is None:
        return
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
    cfg.data.batch_clips = total // world_size

"""Training batch pipelines: clip stream -> frame choice -> decoded images -> FaceSwap -> two augmentation families.

**Three implementations, one interface** (``data.pipeline``, built by :func:`make_batch_pipeline`, one per rank):

* ``torch`` (:mod:`pretrain.pipelines.torch_pipeline`): torchvision/nvjpeg decode + batched torch augmentation;
* ``dali`` (:mod:`pretrain.pipelines.dali_pipeline`): DALI decode and augmentation stages
  (:mod:`pretrain.pipelines.dali_graph`) around the batched torch FaceSwap;
* ``torchvision`` (:mod:`pretrain.pipelines.torchvision_pipeline`): per-sample PIL + torchvision transforms in a
  torch DataLoader, the benchmark baseline and a fallback.

All three read the same :class:`pretrain.stream.ClipStream`, draw frames with the same sampler and per-batch
seeds, and yield the same :class:`pretrain.pipelines.base.Batch` layout; the engine only sees the
:class:`pretrain.pipelines.base.BatchPipeline` interface. Resume is exact for all three: every random draw is
seeded per batch (the DALI path feeds DALI the parameters torch drew, so for the same batch it uses the same
crops, flips, masks and colour factors as ``torch``).
"""

from __future__ import annotations

import torch

from pretrain.dataset import Dataset
from pretrain.pipelines.base import Batch, BatchPipeline
from pretrain.pipelines.torch_pipeline import TorchBatchPipeline

PIPELINES = ("torch", "dali", "torchvision")

__all__ = ["PIPELINES", "Batch", "BatchPipeline", "make_batch_pipeline"]


def make_batch_pipeline(
    cfg, rank: int, world_size: int, device: torch.device | str = "cpu", dataset: Dataset | None = None
) -> BatchPipeline:
    """The batch pipeline ``cfg.data.pipeline`` names (torch | dali | torchvision), same interface for all.

    ``dataset``: this rank's opened dataset (:func:`pretrain.dataset.open_dataset`); None opens ``data.url``.
    """
    kind = getattr(cfg.data, "pipeline", "torch")
    if kind == "torch":
        return TorchBatchPipeline(cfg, rank, world_size, device, dataset)
    if kind == "dali":  # DALI itself is imported only when its stages are built
        from pretrain.pipelines.dali_pipeline import DaliBatchPipeline

        return DaliBatchPipeline(cfg, rank, world_size, device, dataset)
    if kind == "torchvision":
        from pretrain.pipelines.torchvision_pipeline import TorchvisionBatchPipeline

        return TorchvisionBatchPipeline(cfg, rank, world_size, device, dataset)
    raise ValueError(f"config key 'data.pipeline': one of {', '.join(PIPELINES)}, got {kind!r}")

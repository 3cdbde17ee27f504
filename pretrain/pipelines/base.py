"""The interface every batch pipeline implements, the :class:`Batch` it yields, and their shared clip reading.

:class:`BatchPipeline` is all the engine sees: ``__iter__`` yielding :class:`Batch`, ``state_dict`` /
``load_state_dict`` (it satisfies ``torch.distributed.checkpoint.stateful.Stateful``), ``steps_in_epoch`` /
``total_steps``, ``skipped`` / ``skipped_counts`` and ``close``.

:class:`ClipBatchPipeline` is what the three implementations share: this rank's clips from
:class:`pretrain.stream.ClipStream`, each clip's frames drawn with :class:`pretrain.sampling.FrameSampler`
(dropping clips the short-clip policy skips, so every batch has exactly ``data.batch_clips`` clips), grouped into
batches (:class:`pretrain.pipelines.clips.ClipGroup`), the position state and the skip counts. Rows are
``[A, NA, P, NP]`` (``sampling.hard_negatives``) or ``[A, P]``; ``positive_index`` and ``group_id`` come from
:func:`pretrain.loss.batch_layout`, in local rows.

Image datasets (manifest ``kind: frames``, one face JPEG per sample): each image enters the clip grouping as a
clip of one frame (:func:`pretrain.pipelines.clips.as_clip`; the donor bank reads them the same way), so SimCLR
views, FaceSwap and MaskFN work on images unchanged; TimeAug and HardNeg need clips and are refused before
training (:func:`pretrain.preflight.check`).

Determinism: every random draw of batch ``i`` of epoch ``e`` on rank ``r`` comes from generators seeded by
``(seed, e, r, i)`` - frame choice from :func:`pretrain.sampling.make_rng` (its ``worker`` slot is the batch
index), FaceSwap/augmentation from :func:`pretrain.pipelines.clips.device_seed` - so a batch does not depend on
thread timing, and resuming at batch ``i`` reproduces the uninterrupted run. The state is the position after the
last batch the trainer *consumed* (prefetched batches are simply prepared again after a resume).

Equal step counts: every rank yields exactly ``steps_in_epoch(e)`` batches in epoch ``e`` (the stream gives equal
clip counts per rank; if skipped clips leave a rank short, it tops up from the start of its epoch list, counted
as ``epoch_refill``), so collectives never wait on a rank that ran dry.

**Faults** never stop training; each is counted by reason (cumulative, saved in the checkpoint, exported by the
engine through :meth:`BatchPipeline.skipped_counts`) and logged at most a few times per reason:
``truncated_tar`` (corrupt/truncated tar: the shard ends after its last good sample), ``unreadable_shard`` (no
sample at all: the lane reads another of its shards instead), ``short_shard_repeats``, ``bad_json``,
``missing_json``, ``missing_jpeg``, ``corrupt_jpeg`` (the row takes another frame of the same clip),
``missing_landmarks`` / ``bad_landmarks`` (no landmarks, or not (frames, 68, 2) finite numbers: the clip is
skipped), and the sampler's short-clip reasons (``single_frame``, ``hard_negative_short``, ...; a clip is skipped
with ``sampling.short_clip_policy=skip``). Storage problems are not skipped: opening the dataset
(:func:`pretrain.dataset.open_dataset`) checks access first (wrong or missing credentials fail before training
starts), and a store lost mid-run is retried (:func:`pretrain.pipelines.clips.resilient_reader`), then raises.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from data_shards.read import SkipCounter, iter_samples
from pretrain.config import resolve_input_workers
from pretrain.dataset import Dataset, open_dataset
from pretrain.descriptors import build_descriptor
from pretrain.loss import batch_layout
from pretrain.pipelines.clips import ClipGroup, as_clip, choose_frames, resilient_reader
from pretrain.pipelines.donors import DonorBank, DonorStream, load_donor_bank
from pretrain.sampling import FrameSampler, make_rng
from pretrain.stream import ClipStream

STATE_VERSION = 1
log = logging.getLogger(__name__)


@dataclass
class Batch:
    """One rank's training input, on the device."""

    images: torch.Tensor  # (N, 3, crop, crop) float, normalised views
    positive_index: torch.Tensor  # (N,) long, local rows
    group_id: torch.Tensor  # (N,) long, clip number within this rank's batch (same clip = same identity)
    identity: torch.Tensor  # (N,) long, identity_code of each row's clip
    descriptors: torch.Tensor | None  # (N, D) mouth-eye descriptors for MaskFN (None when MaskFN is off)
    swapped: torch.Tensor  # (N,) bool, rows whose face was swapped onto a donor
    clips: int
    epoch: int
    index: int  # batch number within the epoch
    wait_s: float = 0.0  # time the training thread waited for the background threads
    ready: Any = None  # CUDA event of the worker stream that finished the batch (data.finish_in=workers)
    # (N,) long: the row of this batch whose frame was each swapped row's donor; -1 where the row was not swapped
    # or its donor came from outside the batch (stream, bank). None: no FaceSwap.
    donor_row: torch.Tensor | None = None


class BatchPipeline(ABC):
    """Iterable of :class:`Batch` for one rank, stateful: what the engine trains from."""

    @abstractmethod
    def __iter__(self) -> Iterator[Batch]:
        """Batches from the current position on, across epochs; the position advances as batches are consumed."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The position after the last consumed batch, and the cumulative skip counts."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved :meth:`state_dict`: the next batch is the one after the saved position."""

    @abstractmethod
    def steps_in_epoch(self, epoch: int) -> int:
        """Batches per rank in ``epoch`` (the same on every rank)."""

    @abstractmethod
    def skipped(self) -> dict[str, int]:
        """Cumulative counts of skipped/repaired input by reason."""

    @abstractmethod
    def close(self) -> None:
        """Stop background work; iterating again starts it afresh from the current position."""

    def total_steps(self, epochs: int) -> int:
        return sum(self.steps_in_epoch(e) for e in range(epochs))

    def skipped_counts(self) -> dict[str, int]:
        """Alias of :meth:`skipped` (the name the metrics exporter uses)."""
        return self.skipped()


class ClipBatchPipeline(BatchPipeline):
    """The shared half of every pipeline: clips -> frame choice -> clip groups, position state, skip counts.

    Subclasses turn clip groups (:meth:`clip_groups`) into batches in ``__iter__`` and report each batch they
    yield with :meth:`consumed`.
    """

    def __init__(
        self,
        cfg,
        rank: int,
        world_size: int,
        device: torch.device | str = "cpu",
        dataset: Dataset | None = None,
    ):
        self.device = torch.device(device)
        self.cfg = cfg = resolve_input_workers(cfg, self.device.type)  # data.num_workers=auto -> a number
        self.data = cfg.data
        self.rank, self.world_size = rank, world_size
        # Opened by the engine once per rank; opened here for a pipeline built on its own (tests, benchmarks).
        self.dataset = dataset if dataset is not None else open_dataset(self.data.url)
        self.layout = "sslfer" if cfg.sampling.hard_negatives else "simclr"
        self.rows_per_clip = 4 if self.layout == "sslfer" else 2
        if self.device.type == "cpu" and self.data.keep_freed_memory:
            from pretrain.allocator import keep_freed_memory

            keep_freed_memory()  # no page faults for every multi-megabyte temporary of the CPU batch ops
        self.skips = SkipCounter(logger=log)  # counts by reason, rate-limited warnings
        self.counters = self.skips.counts
        # One stream lane per rank: the threads that build batches decode, they do not read shards.
        self.stream = ClipStream.from_dataset(
            self.dataset, self.data, rank=rank, world_size=world_size, num_workers=1,
            read_shard=resilient_reader(iter_samples, self.skips),
        )  # fmt: skip
        if self.steps_in_epoch(0) < 1:
            raise ValueError(
                f"data.url={self.dataset.url}: {self.stream.epoch_length(0)} clips per rank per epoch, fewer "
                f"than data.batch_clips={self.data.batch_clips}: lower data.batch_clips or use more data/fewer "
                "ranks"
            )
        self.sampler = FrameSampler(cfg.sampling)
        self.donor_bank = None  # faceswap.donors=bank: donors from a fixed bank, not from the batch
        if cfg.faceswap.enabled and cfg.faceswap.donors == "bank":
            read_shard = resilient_reader(iter_samples, self.skips)
            bank = load_donor_bank(
                self.dataset, cfg.faceswap.donor_bank_frames, self.data.image_size,
                lambda url: map(as_clip, read_shard(url)), self.skips,  # images: one-frame clips
            )  # fmt: skip
            self.donor_bank = bank.to(self.device)
        self.donor_stream = None  # faceswap.donors=stream: a donor set per refresh, read one refresh ahead
        if cfg.faceswap.enabled and cfg.faceswap.donors == "stream":
            read_shard = resilient_reader(iter_samples, self.skips)
            self.donor_stream = DonorStream(
                self.dataset, cfg.faceswap.donor_bank_frames, self.data.image_size,
                lambda url: map(as_clip, read_shard(url)), self.skips, cfg.seed,
                cfg.faceswap.donor_refresh_steps, self.device,
            )  # fmt: skip
            self.donor_stream.at(0)  # start reading the first two sets now
        self._steps_before: dict[int, int] = {0: 0}
        self.descriptor = (
            build_descriptor(cfg.descriptors).to(self.device).eval() if cfg.loss.fn_mode != "none" else None
        )
        positive, group = batch_layout(self.data.batch_clips, self.layout)
        self.positive_index = positive.to(self.device)
        self.group_id = group.to(self.device)
        self._lock = threading.Lock()
        self._epoch, self._index = 0, 0  # next batch to yield
        self._stream_state: dict[str, Any] | None = None  # stream position after the last consumed batch

    def donors_at(self, epoch: int, index: int) -> tuple[DonorBank | None, bool]:
        """The donor set of batch ``index`` of ``epoch`` (None: the batch's own rows), and whether the batch's
        identities are to be excluded from it (donors=stream)."""
        if self.donor_stream is not None:
            if epoch not in self._steps_before:
                self._steps_before[epoch] = self.total_steps(epoch)
            bank = self.donor_stream.at(self._steps_before[epoch] + index)
            return bank, bank is not None
        return self.donor_bank, False

    def steps_in_epoch(self, epoch: int) -> int:
        """Batches per rank in ``epoch`` (the same on every rank; may vary a little between epochs)."""
        return self.stream.epoch_length(epoch) // self.data.batch_clips

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "rank": self.rank,
            "world_size": self.world_size,
            "epoch": self._epoch,
            "index": self._index,
            "stream": self._stream_state,
            "counters": dict(self.counters),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"data state version {state.get('version')} != {STATE_VERSION}: cannot resume it"
            )
        if state["world_size"] != self.world_size or state["rank"] != self.rank:
            raise ValueError(
                f"data state of rank {state['rank']}/{state['world_size']} loaded on rank "
                f"{self.rank}/{self.world_size}: resume with the same number of ranks"
            )
        self.close()
        self._epoch, self._index = state["epoch"], state["index"]
        self._stream_state = state["stream"]
        self.skips.counts = self.counters = Counter(state.get("counters", {}))

    def consumed(self, epoch: int, index: int, stream_state: dict[str, Any] | None) -> None:
        """Batch ``index`` of ``epoch`` went to the trainer: a checkpoint taken now resumes at the next batch."""
        self._epoch, self._index = epoch, index + 1
        if self._index >= self.steps_in_epoch(epoch):
            self._epoch, self._index, stream_state = epoch + 1, 0, None
        self._stream_state = stream_state

    def skipped(self) -> dict[str, int]:
        """Cumulative counts of skipped/repaired input by reason (see the module docstring)."""
        with self._lock:
            out = Counter(self.counters)
        out.update(self.sampler.counters)
        out.update(self.stream.counters)
        return dict(out)

    # ------------------------------------------------------------------ reading (background)
    def clip_groups(self) -> Iterator[tuple[ClipGroup, dict[str, Any]]]:
        """Clip groups from the current position on, forever; yields (group, stream state after it)."""
        return self._groups_from(self._epoch, self._index, self._stream_state)

    def _groups_from(self, epoch: int, index: int, stream_state: dict[str, Any] | None):
        b = self.data.batch_clips
        while True:
            if stream_state is not None and index > 0:
                self.stream.load_state_dict(stream_state)
            else:
                self.stream.set_epoch(epoch)
            clips = iter(self.stream)
            refills = 0
            steps = self.steps_in_epoch(epoch)
            steps_before = self.total_steps(epoch) if self.cfg.faceswap.p_warmup_steps else 0
            while index < steps:
                rng = make_rng(self.cfg.seed, epoch, self.rank, index)
                samples, choices = [], []
                while len(samples) < b:
                    sample = next(clips, None)
                    if sample is None:  # skipped clips left this rank short: top up from its epoch start
                        refills += 1
                        if refills > 1 + steps:
                            raise RuntimeError(
                                f"rank {self.rank}: no usable clips in epoch {epoch} of {self.dataset.url} "
                                "(every clip is skipped by sampling.short_clip_policy?)"
                            )
                        with self._lock:
                            self.counters["epoch_refill"] += 1
                        self.stream.set_epoch(epoch)
                        clips = iter(self.stream)
                        continue
                    sample = as_clip(sample)  # an image (frames dataset) is a clip of one frame
                    choice = choose_frames(sample, self.sampler, self.layout, rng, self.skips)
                    if choice is None:
                        continue
                    samples.append(sample)
                    choices.append(choice)
                state = self.stream.state_dict()
                swap_p = self.cfg.faceswap.probability_at(steps_before + index)
                yield ClipGroup(epoch, index, samples, choices, swap_p), state
                index += 1
            epoch, index, stream_state = epoch + 1, 0, None

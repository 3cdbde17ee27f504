"""Clip stream: shard list -> per-epoch shuffled, rank/worker-split, equal-length, resumable samples.

Per epoch ``e``:

1. **Shard order.** All shards are permuted with a generator seeded by ``(seed, e)`` -- the same on every
   rank -- BEFORE splitting, so each epoch gives each rank different shards.
2. **Split.** Rank ``r`` takes ``order[r::world_size]``, its worker ``w`` takes ``rank_shards[w::num_workers]``.
   One (rank, worker) pair is a *lane*; lanes hold disjoint shards.
3. **Equal length.** Every lane yields exactly the same number of samples, ``quota`` (from the manifest's
   per-shard counts, so all ranks agree without talking): ``equalize="drop"`` uses the smallest lane's count
   (bigger lanes stop early; what they drop changes every epoch with the shard order), ``"repeat"`` uses the
   largest (smaller lanes wrap around to the start of their own shards). So every rank runs the same number of
   steps and collectives never hang. ``resampled=True`` instead draws each lane's shards with replacement
   (seeded by ``(seed, e, rank, worker)``) until ``total_samples // lanes`` samples.
4. **Shuffle buffer.** A buffer of ``shuffle_buffer`` samples per lane, seeded by ``(seed, e, rank, worker)``:
   once full, each incoming sample replaces a uniformly chosen one, which is emitted; at the end of the lane
   the rest is emitted in random order.

**Resume.** The buffer's choices depend only on the seed and on counts, never on sample contents, so the whole
emission order of a lane is a pure function of ``(seed, epoch, rank, worker, manifest counts)``. The state is
therefore tiny: the epoch and the number of samples each worker lane has emitted (``consumed``). A resumed
stream replays the key schedule (no I/O), re-reads only the shards that still had samples in the buffer
(usually one or two) and continues with the very next sample: no repeats and no drops. This is exact as long
as the shards hold the sample counts their manifest says (``python -m data_shards verify``); a shard that yields
fewer samples is completed with repeats of its own samples (counted as ``short_shard_repeats``) so that all
lanes keep the same length. The state does not depend on the rank (all ranks consume in lockstep), so one copy
saved by rank 0 resumes every rank, but a different ``world_size`` or ``num_workers`` changes the lanes and is
refused (:class:`StreamStateError`), unless loaded with ``allow_restart_epoch=True``, which starts the next
epoch afresh (the unseen rest of the interrupted epoch is skipped, at most one epoch of samples).

**Workers.** Used in-process (no DataLoader workers) the stream interleaves its worker lanes round-robin and
tracks ``consumed`` itself. Under a ``torch.utils.data.DataLoader`` each worker process serves its own lane;
every sample carries ``__epoch__``, ``__worker__`` and ``__seq__`` (its index in the lane), so the trainer
can record ``consumed[w] = last __seq__ + 1`` and build the state with :meth:`ClipStream.make_state`. Call
:meth:`ClipStream.set_epoch` before each epoch, as with a ``DistributedSampler``.

**Input.** The shard list and per-shard counts come from an opened :class:`pretrain.dataset.Dataset`
(:meth:`ClipStream.from_dataset`): the stream never reads the manifest itself.

**Integrity** (``data.verify_sha256``, on by default). The stream hands each shard's manifest sha256 to the shard
reader (``read_shard(url, sha256=...)``, when the reader takes that keyword, as
:func:`data_shards.read.iter_samples` and :func:`pretrain.pipelines.clips.resilient_reader` do), which hashes the
bytes as they stream and, at the end of the shard, counts a mismatch (``sha256_mismatch``) and raises
:class:`data_shards.read.ShardIntegrityError`. The stream then treats the shard like an unreadable one: its
remaining slots are filled from the lane's next shards (``unreadable_shard``), and for the rest of the run this
stream (each rank and loader worker has its own) does not read the shard again (:attr:`ClipStream.bad_shards`; a
resumed run finds it again when it reads it). Samples
already taken from it are kept: shards up to :data:`data_shards.read.VERIFY_BUFFER_BYTES` are checked before
their first sample is yielded, so none of theirs is used; a bigger shard is streamed and only found out at its
end, when its samples are already in the shuffle buffer or in a batch (streaming cannot know earlier without
holding the whole shard). After the last sample the manifest lists, the stream reads the shard to its end so the
check runs (for the lane's last shard, as soon as the lane's last input is read); a shard the lane stops inside
(``equalize=drop``, or the partial re-read of a resume) is not checked in that pass. Datasets without a manifest (brace-expanded URLs) carry no sha256 and are not checked.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Literal

import numpy as np
import torch.utils.data

from common.errors import ConfigError, UserError
from data_shards.read import ShardIntegrityError
from pretrain.dataset import Dataset

Sample = dict[str, Any]
ShardReader = Callable[[str], Iterator[Sample]]
Key = tuple[int, int]  # (position in the lane's shard plan, sample index within that shard)

STATE_VERSION = 1
# Stream tags for the seed sequence, so shard order, buffer and resampling never share random numbers.
_SHARD_ORDER, _BUFFER, _RESAMPLE = 101, 102, 103
_DRAW_BLOCK = 1024


class StreamError(UserError, RuntimeError):
    """The dataset cannot be streamed as configured (message names the setting or file and the fix)."""


class StreamStateError(StreamError):
    """A saved stream state does not match this stream (world size, workers, seed, dataset)."""


@dataclass
class StreamConfig:
    url: str = ""  # dataset folder or s3:// prefix holding manifest.json, or brace-expanded shard URLs
    shuffle_buffer: int = 256  # samples per worker lane; 1 disables shuffling inside shards
    seed: int = 0  # seeds the per-epoch shard shuffle and the shuffle buffers
    resampled: bool = False  # draw shards with replacement (ranks may overlap)
    equalize: Literal["drop", "repeat"] = "drop"  # how lanes with more/fewer samples are made equal

    def validate(self) -> None:

        if self.shuffle_buffer < 1:
            raise ConfigError(f"config key 'data.shuffle_buffer': must be >= 1, got {self.shuffle_buffer}")
        if self.seed < 0:
            raise ConfigError(f"config key 'data.seed': must be >= 0, got {self.seed}")


def _rng(*parts: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(parts))))


class _KeySchedule:
    """The shuffle buffer run over sample keys only; iterating yields the lane's keys in emission order.

    ``consumed_inputs`` (keys read so far) and ``pending`` (read, not yet emitted) describe the buffer at any
    point, which is all a resumed reader needs.
    """

    def __init__(self, plan_counts: list[int], quota: int, buffer_size: int, rng: np.random.Generator):
        self.cum = list(accumulate(plan_counts))
        self.plan_len = len(plan_counts)
        self.quota = quota
        self.size = buffer_size
        self.rng = rng
        self.consumed_inputs = 0
        self.pending: list[Key] = []

    def input_key(self, n: int) -> Key:
        """Key of the n-th input, wrapping around the plan (``repeat`` and short plans)."""
        total = self.cum[-1]
        cycle, rest = divmod(n, total)
        j = bisect.bisect_right(self.cum, rest)
        return cycle * self.plan_len + j, rest - (self.cum[j - 1] if j else 0)

    def __iter__(self) -> Iterator[Key]:
        draws: np.ndarray = np.empty(0, dtype=np.int64)
        d = 0
        while self.consumed_inputs < self.quota:
            key = self.input_key(self.consumed_inputs)
            self.consumed_inputs += 1
            if len(self.pending) < self.size:
                self.pending.append(key)
                continue
            if d == len(draws):
                draws, d = self.rng.integers(0, self.size, size=_DRAW_BLOCK), 0
            slot = int(draws[d])
            d += 1
            out, self.pending[slot] = self.pending[slot], key
            yield out
        # drain: random order; kept reversed so pop() is cheap and `pending` stays exact
        order = self.rng.permutation(len(self.pending))
        self.pending = [self.pending[i] for i in order[::-1]]
        while self.pending:
            yield self.pending.pop()


class _LaneReader:
    """Materialises keys: reads the lane's shards in plan order, keeping read-but-unemitted samples."""

    def __init__(
        self,
        urls: list[str],
        counts: list[int],
        read_shard: ShardReader,
        counters: Counter,
        bad_shards: set[str] | None = None,
        verifying: bool = False,
    ):
        self.urls, self.counts = urls, counts  # both indexed by plan position modulo the plan length
        super().__init__()
        self.read_shard = read_shard
        self.counters = counters
        self.bad_shards = bad_shards if bad_shards is not None else set()  # failed their sha256 check
        self.verifying = verifying  # read_shard checks sha256: read each shard to its end
        self.cache: dict[Key, Sample] = {}
        self._seq: Iterator[tuple[Key, Sample]] | None = None
        self._current: Iterator[tuple[int, Sample]] | None = None  # the shard _seq is reading
        self._current_complete = False  # it has yielded the manifest's count of samples
        self.final_input: Key | None = None  # the lane's last input: once read, its shard is finished

    def _open(self, url: str) -> Iterator[Sample]:
        if url in self.bad_shards:
            return iter(())  # known not to be the shard its manifest describes: read like an unreadable one
        return iter(self.read_shard(url))

    def _shard(self, j: int, start: int) -> Iterator[tuple[int, Sample]]:
        """(index, sample) for indices start..count-1 of plan position j; short shards repeat themselves."""
        url = self.urls[j % len(self.urls)]
        expected = self.counts[j % len(self.counts)]
        it = self._open(url)
        idx = got_since_open = substitute = 0
        reopened = False
        while idx < expected:
            try:
                sample = next(it)
            except (StopIteration, ShardIntegrityError) as end:
                if isinstance(end, ShardIntegrityError):
                    self.bad_shards.add(url)  # counted (sha256_mismatch) and logged by the reader
                if got_since_open == 0 or url in self.bad_shards:
                    # Unreadable (e.g. corrupt from its first byte) or not the shard the manifest describes (its
                    # sha256): fill its remaining slots from the lane's next shards, deterministically, so every
                    # lane keeps its length. Fatal only if none reads.
                    substitute += 1
                    if substitute >= len(self.urls):
                        raise StreamError(
                            f"shard '{url}' yielded no usable samples but its manifest lists {expected}, and no "
                            "other shard of this lane could be read or passed its sha256 check: check the "
                            "dataset with `python -m data_shards verify` and rewrite it or remove the bad shards"
                        ) from None
                    if substitute == 1:
                        self.counters["unreadable_shard"] += 1
                    url = self.urls[(j + substitute) % len(self.urls)]
                    it, got_since_open = self._open(url), 0
                    continue
                if not reopened:  # count the shortfall once; index i then maps to sample i mod actual
                    self.counters["short_shard_repeats"] += expected - idx
                    reopened = True
                it, got_since_open = iter(self.read_shard(url)), 0
                continue
            got_since_open += 1
            if idx >= start:
                self._current_complete = idx + 1 >= expected
                yield idx, sample
            idx += 1
        if self.verifying and not reopened and url not in self.bad_shards:
            # The manifest's count is reached: read on to the end of the shard so its sha256 is checked (any
            # extra samples, which a shard matching its manifest does not have, are dropped).
            try:
                for _ in it:
                    pass
            except ShardIntegrityError:
                self.bad_shards.add(url)

    def _sequential(self, j: int, i: int) -> Iterator[tuple[Key, Sample]]:
        while True:
            self._current, self._current_complete = self._shard(j, i), False
            for idx, sample in self._current:
                yield (j, idx), sample
            j, i = j + 1, 0

    def start(self, next_input: Key, resident: list[Key]) -> None:
        """Position the reader at ``next_input`` after re-reading the samples still in the buffer."""
        self.cache.clear()
        by_shard: dict[int, set[int]] = {}
        for j, i in resident:
            by_shard.setdefault(j, set()).add(i)
        for j, wanted in sorted(by_shard.items()):
            last = max(wanted)
            for idx, sample in self._shard(j, min(wanted)):
                if idx in wanted:
                    self.cache[(j, idx)] = sample
                if idx >= last:
                    break
        self._seq = self._sequential(*next_input)

    def get(self, key: Key) -> Sample:
        while key not in self.cache:
            k, sample = next(self._seq)
            self.cache[k] = sample
            if k == self.final_input and self.verifying and self._current_complete:
                # Nothing more is read in this lane: finish the shard now so its sha256 is checked too.
                next(self._current, None)
        return self.cache.pop(key)


class ClipStream(torch.utils.data.IterableDataset):
    """Iterable of clip samples for one rank; see the module docstring for the policies.

    ``shard_urls``/``sample_counts``: every shard of the dataset (the same list on every rank) and its sample
    count from the manifest. ``read_shard(url)`` yields sample dicts in a fixed order
    (default ``data_shards.read.iter_samples``).
    """

    def __init__(
        self,
        shard_urls: list[str],
        sample_counts: list[int],
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 256,
        equalize: Literal["drop", "repeat"] = "drop",
        resampled: bool = False,
        read_shard: ShardReader | None = None,
        shard_sha256: list[str] | None = None,
    ):
        if len(shard_urls) != len(sample_counts):
            raise ValueError("shard_urls and sample_counts must have the same length")
        if shard_sha256 is not None and len(shard_sha256) != len(shard_urls):
            raise ValueError("shard_sha256 must list one digest per shard URL")
        if not shard_urls:
            raise StreamError("the dataset has no shards: check data.url (it must hold manifest.json)")
        if not 0 <= rank < world_size or num_workers < 1:
            raise ValueError(f"bad rank/world_size/num_workers: {rank}/{world_size}/{num_workers}")
        lanes = world_size * num_workers
        if not resampled and len(shard_urls) < lanes:
            raise StreamError(
                f"{len(shard_urls)} shards cannot be split over {world_size} ranks x {num_workers} workers: "
                f"write at least {lanes} shards (smaller shards), use fewer loader workers, or set "
                "data.resampled=true"
            )
        if sum(sample_counts) == 0:
            raise StreamError("the dataset's manifest lists 0 samples: nothing to stream")
        self.shard_urls = list(shard_urls)
        self.sample_counts = [int(c) for c in sample_counts]
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.seed, self.shuffle_buffer = seed, max(1, shuffle_buffer)
        self.equalize, self.resampled = equalize, resampled
        super().__init__()
        self.read_shard = read_shard
        # The manifest's sha256 per shard ("" or None: unchecked); each is checked while the shard streams.
        self.shard_sha256 = list(shard_sha256) if shard_sha256 is not None else None
        self.bad_shards: set[str] = set()  # shard URLs whose sha256 did not match: not read again this run
        self.counters: Counter[str] = Counter()
        self.epoch = 0
        self.consumed = [0] * num_workers

    @classmethod
    def from_dataset(
        cls,
        dataset: Dataset,
        cfg: StreamConfig,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 1,
        read_shard: ShardReader | None = None,
    ) -> ClipStream:
        """The stream of an opened dataset (its shard list and manifest counts) with the ``data.*`` settings.

        With ``data.verify_sha256`` (default on) and a manifest, each shard is checked against its sha256."""
        digests = None
        if getattr(cfg, "verify_sha256", True) and dataset.manifest is not None:
            digests = [str(s.get("sha256") or "") for s in dataset.manifest["shards"]]
        return cls(
            list(dataset.shard_urls), list(dataset.sample_counts), rank, world_size, num_workers, cfg.seed,
            cfg.shuffle_buffer, cfg.equalize, cfg.resampled, read_shard, digests,
        )  # fmt: skip

    # ---- the per-epoch plan (pure functions of seed, epoch, rank, worker) ----
    def _lane_shards(self, epoch: int, rank: int, worker: int) -> list[int]:
        order = _rng(self.seed, epoch, _SHARD_ORDER).permutation(len(self.shard_urls))
        return [int(s) for s in order[rank :: self.world_size][worker :: self.num_workers]]

    def epoch_length(self, epoch: int | None = None) -> int:
        """Samples per worker lane in ``epoch`` (the same on every rank); a rank yields this x num_workers."""
        epoch = self.epoch if epoch is None else epoch
        lanes = self.world_size * self.num_workers
        if self.resampled:
            return max(1, sum(self.sample_counts) // lanes)
        sizes = [
            sum(self.sample_counts[s] for s in self._lane_shards(epoch, r, w))
            for r in range(self.world_size)
            for w in range(self.num_workers)
        ]
        return min(sizes) if self.equalize == "drop" else max(sizes)

    def _plan(self, epoch: int, worker: int, quota: int) -> list[int]:
        if not self.resampled:
            plan = self._lane_shards(epoch, self.rank, worker)
            if sum(self.sample_counts[s] for s in plan) == 0:
                raise StreamError(f"rank {self.rank} worker {worker} got only empty shards in epoch {epoch}")
            return plan
        rng = _rng(self.seed, epoch, self.rank, worker, _RESAMPLE)
        plan: list[int] = []
        total = 0
        while total < quota or total == 0:
            s = int(rng.integers(len(self.shard_urls)))
            plan.append(s)
            total += self.sample_counts[s]
        return plan

    def _iter_lane(self, epoch: int, worker: int, skip: int) -> Iterator[Sample]:
        quota = self.epoch_length(epoch)
        plan = self._plan(epoch, worker, quota)
        counts = [self.sample_counts[s] for s in plan]
        schedule = _KeySchedule(
            counts, quota, self.shuffle_buffer, _rng(self.seed, epoch, self.rank, worker, _BUFFER)
        )
        keys = iter(schedule)
        for _ in range(skip):  # replay the buffer's decisions without reading anything
            next(keys)
        read, verifying = self._checked_reader()
        reader = _LaneReader(
            [self.shard_urls[s] for s in plan], counts, read, self.counters, self.bad_shards, verifying
        )
        reader.final_input = schedule.input_key(quota - 1) if quota > 0 else None
        reader.start(schedule.input_key(schedule.consumed_inputs), list(schedule.pending))
        for seq, key in enumerate(keys, start=skip):
            sample = dict(reader.get(key))
            sample.update(__epoch__=epoch, __worker__=worker, __seq__=seq)
            yield sample

    def _reader(self) -> ShardReader:
        if self.read_shard is None:
            from data_shards.read import iter_samples  # lazy: keeps this module importable alone

            self.read_shard = iter_samples
        return self.read_shard

    def _checked_reader(self) -> tuple[ShardReader, bool]:
        """``url -> samples`` passing each shard's manifest sha256 to the reader; (reader, whether it checks)."""
        from data_shards.read import accepts_sha256

        read = self._reader()
        if not self.shard_sha256 or not any(self.shard_sha256) or not accepts_sha256(read):
            return read, False
        digests = dict(zip(self.shard_urls, self.shard_sha256))

        def read_checked(url: str) -> Iterator[Sample]:
            digest = digests.get(url)
            return read(url, sha256=digest) if digest else read(url)

        return read_checked, True

    # ---- iteration ----
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to stream next; progress is kept only when it is the current epoch."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.consumed = [0] * self.num_workers

    def __iter__(self) -> Iterator[Sample]:
        """The rest of the current epoch; afterwards the stream moves to the next epoch."""
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers != self.num_workers:
            raise StreamError(
                f"the stream was built for {self.num_workers} loader workers but the DataLoader has "
                f"{info.num_workers}: pass the same num_workers to both"
            )
        # in-process: the lane that is behind goes first, so a resumed round-robin continues in order
        workers = (
            [info.id] if info is not None else sorted(range(self.num_workers), key=lambda w: self.consumed[w])
        )
        epoch = self.epoch
        lanes = [(w, self._iter_lane(epoch, w, self.consumed[w])) for w in workers]
        while lanes:  # round-robin, like a DataLoader taking one item per worker in turn
            alive = []
            for w, lane in lanes:
                sample = next(lane, None)
                if sample is None:
                    continue
                self.consumed[w] += 1
                alive.append((w, lane))
                yield sample
            lanes = alive
        self.epoch, self.consumed = epoch + 1, [0] * self.num_workers

    # ---- state ----
    def _identity(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "seed": self.seed,
            "num_shards": len(self.shard_urls),
            "num_samples": sum(self.sample_counts),
            "shuffle_buffer": self.shuffle_buffer,
            "equalize": self.equalize,
            "resampled": self.resampled,
        }

    def make_state(self, epoch: int, consumed: list[int]) -> dict[str, Any]:
        """A state for ``epoch`` with ``consumed[w]`` samples taken from worker lane w (DataLoader use)."""
        return {"version": STATE_VERSION, "epoch": epoch, "consumed": list(consumed), **self._identity()}

    def state_dict(self) -> dict[str, Any]:
        return self.make_state(self.epoch, self.consumed)

    def load_state_dict(self, state: dict[str, Any], allow_restart_epoch: bool = False) -> None:
        if state.get("version") != STATE_VERSION:
            raise StreamStateError(f"stream state version {state.get('version')!r} is not {STATE_VERSION}")
        mine = self._identity()
        diffs = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in mine.items() if state.get(k) != v]
        if diffs:
            if allow_restart_epoch:
                self.epoch, self.consumed = int(state["epoch"]) + 1, [0] * self.num_workers
                return
            raise StreamStateError(
                "the saved data-stream position does not fit this run ("
                + "; ".join(diffs)
                + "). Resume with "
                "the same world size, loader workers, seed and dataset, or allow restarting at the next epoch "
                "(skips the rest of the interrupted epoch)"
            )
        self.epoch = int(state["epoch"])
        self.consumed = [int(c) for c in state["consumed"]]

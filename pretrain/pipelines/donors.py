"""FaceSwap donors from the dataset: a refreshed stream (``faceswap.donors=stream``) or a fixed bank (``bank``).

Why: with in-batch donors every donor row is also a negative of the anchor, so a swapped positive is, outside
its pasted inner face, pixel-identical to one of the anchor's negatives. Matching the anchor through identity
is then actively punished on every swapped row, and at ``faceswap.p=0.8`` the optimum at small scale is a
constant embedding (docs/results/FINDINGS.md). Donors drawn from a bank are, almost always, not in the batch.

The bank is deterministic: the middle frame of each clip, clips in manifest order (one per clip so the bank
spans as many people as possible), until ``faceswap.donor_bank_frames`` frames. Every rank builds the same
bank; each batch draws its donors from it with the batch's seeded generator, so resume stays exact.
Unreadable clips are skipped and counted like any bad input.

The stream (the default) is closer to the paper, whose donor is a random frame of a random clip of the whole
dataset: every ``faceswap.donor_refresh_steps`` batches the set is replaced by a fresh one, read from shards in
a seeded random order over the whole manifest, one random frame per clip (:class:`DonorStream`).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from pretrain.dataset import Dataset
from pretrain.decode import decode_jpegs_skipping
from pretrain.pipelines.clips import clip_identity, frame_landmarks, validate_landmarks


@dataclass
class DonorBank:
    images: torch.Tensor  # uint8 (K, 3, S, S)
    landmarks: torch.Tensor  # float32 (K, 68, 2), pixel coords of the S x S image
    identity: torch.Tensor  # int64 (K,), identity codes as in the batches

    def to(self, device: torch.device | str) -> DonorBank:
        return DonorBank(self.images.to(device), self.landmarks.to(device), self.identity.to(device))

    def numpy(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(K, S, S, 3) uint8 images, (K, 68, 2) landmarks, (K,) identities (the torchvision pipeline's form)."""
        return (
            self.images.permute(0, 2, 3, 1).contiguous().cpu().numpy(),
            self.landmarks.cpu().numpy(),
            self.identity.cpu().numpy(),
        )


def load_donor_bank(dataset: Dataset, frames: int, image_size: int, read_shard, skips) -> DonorBank:
    """Read the bank from ``dataset``'s shards (``read_shard(url)`` yields clip samples, with retries)."""
    jpegs, landmarks, identities = [], [], []
    for shard_url in dataset.shard_urls:
        for sample in read_shard(shard_url):
            clip_frames, meta = sample.get("frames"), sample["meta"]
            if not clip_frames or validate_landmarks(meta, len(clip_frames)) is not None:
                continue  # counted by the training stream when it meets the clip
            middle = len(clip_frames) // 2
            jpegs.append(clip_frames[middle])
            landmarks.append(frame_landmarks(sample, middle, image_size))
            identities.append(clip_identity(sample))
            if len(jpegs) >= frames:
                break
        if len(jpegs) >= frames:
            break
    return _decode_bank(jpegs, landmarks, identities, image_size, skips, dataset.url, "bank")


def _decode_bank(jpegs, landmarks, identities, image_size: int, skips, url: str, kind: str) -> DonorBank:
    """Decode the chosen frames; corrupt ones are left out and counted. At least 2 identities are needed."""
    images, bad = decode_jpegs_skipping(jpegs, "cpu", image_size) if jpegs else (None, [])
    for i in bad:
        skips("corrupt_jpeg", f"donor {kind} frame {i}: left out of the donor set")
    good = [i for i in range(len(jpegs)) if i not in set(bad)]
    if images is None or len(set(identities[i] for i in good)) < 2:
        raise ValueError(
            f"faceswap.donors={kind}: {url} gave {len(good)} usable donor frames of "
            f"{len(set(identities[i] for i in good))} identities; at least 2 identities are needed "
            "(use faceswap.donors=batch or more data)"
        )
    return DonorBank(
        images=images,
        landmarks=torch.from_numpy(np.stack([landmarks[i] for i in good])),
        identity=torch.tensor([identities[i] for i in good], dtype=torch.int64),
    )


def _donor_rng(seed: int, refresh: int) -> np.random.Generator:
    """The donor set's generator: a pure function of (seed, refresh index), the same on every rank."""
    return np.random.default_rng([seed & 0xFFFFFFFF, refresh, 0xD0_0A])


def load_stream_donors(
    dataset: Dataset, frames: int, image_size: int, read_shard, skips, seed: int, refresh: int
) -> DonorBank:
    """The donor set of refresh ``refresh`` (``faceswap.donors=stream``): shards in a seeded random order over
    the whole manifest, one seeded random frame per usable clip, at most a quarter of the set per shard (so
    at least four shards, and as many people as they hold), until ``frames`` frames."""
    rng = _donor_rng(seed, refresh)
    urls = dataset.shard_urls
    per_shard = -(-frames // min(4, len(urls)))
    jpegs, landmarks, identities = [], [], []
    for shard in rng.permutation(len(urls)):
        taken = 0
        for sample in read_shard(urls[shard]):
            clip_frames, meta = sample.get("frames"), sample["meta"]
            if not clip_frames or validate_landmarks(meta, len(clip_frames)) is not None:
                continue  # counted by the training stream when it meets the clip
            pos = int(rng.integers(len(clip_frames)))
            jpegs.append(clip_frames[pos])
            landmarks.append(frame_landmarks(sample, pos, image_size))
            identities.append(clip_identity(sample))
            taken += 1
            if taken >= per_shard or len(jpegs) >= frames:
                break
        if len(jpegs) >= frames:
            break
    return _decode_bank(jpegs, landmarks, identities, image_size, skips, dataset.url, "stream")


class DonorStream:
    """``faceswap.donors=stream``: the donor set of batch ``s`` (of the run) is
    ``load_stream_donors(..., refresh=s // refresh_steps)``, read in a background thread one refresh ahead.

    A pure function of (seed, s // refresh_steps): every rank holds the same set and a resumed run reads the
    same one, with no checkpoint state. Only the current and the next set are kept.
    """

    def __init__(self, dataset: Dataset, frames: int, image_size: int, read_shard, skips, seed: int,
                 refresh_steps: int, device: torch.device | str = "cpu"):  # fmt: skip
        self.refresh_steps = refresh_steps
        self._args = (dataset, frames, image_size, read_shard, skips, seed)
        self._device, self._skips = device, skips
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="donor-stream")
        self._sets: dict[int, Future] = {}
        self._lock = threading.Lock()
        self.loads = 0  # donor sets read so far (prefetches included)

    def _load(self, refresh: int) -> DonorBank | None:
        """One refresh's set; None (counted, the batches fall back to in-batch donors) if it has < 2 people."""
        try:
            return load_stream_donors(*self._args, refresh).to(self._device)
        except ValueError as err:
            self._skips("donor_set_unusable", f"donor refresh {refresh}: {err}")
            return None

    def _submit(self, refresh: int) -> Future:
        if refresh not in self._sets:
            self.loads += 1
            self._sets[refresh] = self._pool.submit(self._load, refresh)
        return self._sets[refresh]

    def refresh_of(self, step: int) -> int:
        return step // self.refresh_steps

    def at(self, step: int) -> DonorBank | None:
        """The donor set of batch ``step`` of the run (None: unusable, see :meth:`_load`); starts reading the
        next one."""
        refresh = self.refresh_of(step)
        with self._lock:
            for old in [r for r in self._sets if r < refresh]:  # sets of earlier refreshes are not used again
                del self._sets[old]
            current = self._submit(refresh)
            self._submit(refresh + 1)
        return current.result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

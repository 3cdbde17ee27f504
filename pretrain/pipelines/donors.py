"""The FaceSwap donor bank (``faceswap.donors=bank``): a fixed set of faces read from the dataset at start.

Why: with in-batch donors every donor row is also a negative of the anchor, so a swapped positive is, outside
its pasted inner face, pixel-identical to one of the anchor's negatives. Matching the anchor through identity
is then actively punished on every swapped row, and at ``faceswap.p=0.8`` the optimum at small scale is a
constant embedding (docs/results/FINDINGS.md). Donors drawn from a bank are, almost always, not in the batch.

The bank is deterministic: the middle frame of each clip, clips in manifest order (one per clip so the bank
spans as many people as possible), until ``faceswap.donor_bank_frames`` frames. Every rank builds the same
bank; each batch draws its donors from it with the batch's seeded generator, so resume stays exact.
Unreadable clips are skipped and counted like any bad input.
"""

from __future__ import annotations

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
    images, bad = decode_jpegs_skipping(jpegs, "cpu", image_size) if jpegs else (None, [])
    for i in bad:
        skips("corrupt_jpeg", f"donor bank frame {i}: left out of the bank")
    good = [i for i in range(len(jpegs)) if i not in set(bad)]
    if images is None or len(set(identities[i] for i in good)) < 2:
        raise ValueError(
            f"faceswap.donors=bank: {dataset.url} gave {len(good)} usable donor frames of "
            f"{len(set(identities[i] for i in good))} identities; at least 2 identities are needed "
            "(use faceswap.donors=batch or more data)"
        )
    return DonorBank(
        images=images,
        landmarks=torch.from_numpy(np.stack([landmarks[i] for i in good])),
        identity=torch.tensor([identities[i] for i in good], dtype=torch.int64),
    )

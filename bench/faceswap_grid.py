"""Write a PNG grid to eyeball FaceSwap: rows anchor / positive / swapped positive / donor, one column per clip.

Faces come from clip shards (``--shards URL ...``), else from SynthFace (``data_shards.synth``) when it is
installed, else from the toy faces in ``pretrain.faceswap``. The positive is a frame ``--offset`` after the anchor;
donors are anchors of other clips (another identity), drawn with the seeded generator.

    python bench/faceswap_grid.py --out runs/faceswap_grid.png [--shards path/shard-000000.tar] [--clips 8]
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.faceswap import FaceSwap, FaceSwapConfig, toy_faces  # noqa: E402

Clip = tuple[list[np.ndarray], np.ndarray, str]  # frames (HxWx3 uint8), landmarks (T, 68, 2), identity


def clips_from_shards(urls: list[str], count: int) -> list[Clip]:
    from data_shards.read import iter_samples

    clips: list[Clip] = []
    for url in urls:
        for sample in iter_samples(url):
            frames = [np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) for j in sample["frames"]]
            meta = sample["meta"]
            clips.append((frames, np.asarray(meta["landmarks"], np.float32), str(meta.get("identity_id"))))
            if len(clips) == count:
                return clips
    return clips


def clips_from_synth(count: int) -> list[Clip] | None:
    try:
        from data_shards.synth import SynthConfig, iter_clips
    except ImportError:
        return None
    clips: list[Clip] = []
    for clip in iter_clips(SynthConfig()):
        meta = clip.meta
        identity = str(meta.get("identity_id", len(clips)))
        clips.append((list(clip.frames), np.asarray(meta["landmarks"], np.float32), identity))
        if len(clips) == count:
            break
    return clips


def clips_from_toys(count: int, seed: int) -> list[Clip]:
    images, lm = toy_faces(2 * count, 128, torch.Generator().manual_seed(seed))
    arrays = images.permute(0, 2, 3, 1).numpy()
    # Two "frames" per toy identity: same face family, different mouth opening.
    return [([arrays[i], arrays[count + i]], lm[[i, count + i]].numpy(), f"toy{i}") for i in range(count)]


def to_tensor(frames: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/faceswap_grid.png")
    parser.add_argument("--shards", nargs="*", default=[])
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--offset", type=int, default=4, help="positive = anchor frame + offset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--landmarks", action="store_true", help="draw the swapped image's landmarks")
    args = parser.parse_args()

    if args.shards:
        clips, origin = clips_from_shards(args.shards, args.clips), "shards"
    else:
        clips, origin = clips_from_synth(args.clips), "synth"
        if clips is None:
            clips, origin = clips_from_toys(args.clips, args.seed), "toy faces (data_shards.synth not found)"
    if len(clips) < 2:
        raise SystemExit("faceswap_grid: need at least 2 clips of different identities")
    anchors = to_tensor([c[0][0] for c in clips])
    positives = to_tensor([c[0][min(args.offset, len(c[0]) - 1)] for c in clips])
    anchor_lm = torch.from_numpy(np.stack([c[1][0] for c in clips]))
    positive_lm = torch.from_numpy(np.stack([c[1][min(args.offset, len(c[0]) - 1)] for c in clips]))
    ids = {name: i for i, name in enumerate(sorted({c[2] for c in clips}))}
    identity = torch.tensor([ids[c[2]] for c in clips])

    swap = FaceSwap(FaceSwapConfig(p=1.0))
    result = swap(
        positives, positive_lm, identity, torch.Generator().manual_seed(args.seed),
        donor_images=anchors, donor_landmarks=anchor_lm, donor_identity=identity,
    )  # fmt: skip
    donors = torch.stack([anchors[i] if i >= 0 else torch.zeros_like(anchors[0]) for i in result.donor_index])

    rows = [anchors, positives, result.images, donors]
    size = anchors.shape[-1]
    grid = Image.new("RGB", (size * len(clips), size * len(rows)))
    for r, row in enumerate(rows):
        for c, image in enumerate(row.permute(0, 2, 3, 1).numpy()):
            grid.paste(Image.fromarray(image), (c * size, r * size))
    if args.landmarks:
        draw = ImageDraw.Draw(grid)
        for c, pts in enumerate(result.landmarks.numpy()):
            for x, y in pts:
                draw.point((c * size + x, 2 * size + y), fill=(0, 255, 0))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    print(f"faceswap_grid: {len(clips)} clips from {origin}; rows anchor/positive/swapped/donor -> {out}")


if __name__ == "__main__":
    main()

"""How visible is expression in SynthFace pixels? A supervised ceiling on held-out identities.

    OMP_NUM_THREADS=1 .venv/bin/python bench/expression_ceiling.py [--size 64] [--identities 40] [--epochs 30]
        [--intensity LO HI] [--expression-scale G] [--zoom Z] [--speech S] [--seed 0]

Generates a labelled SynthFace evaluation set in memory (the same layout as the ablation's
``python -m data_shards evalset --source synth --clips-per-identity 4 --seconds 12 --frames-per-clip 8``: frames
spread over 12 s clips, so transitions and speech are included), splits the identities into two disjoint halves,
trains the project's backbone (``pretrain.model.ResNetBackbone``, ResNet-18 width 16 as in
``launch/configs/demo.yaml``) plus a linear classifier *supervised* on the first half, and reports expression
accuracy and macro-F1 on the second half. Images are preprocessed like pretraining's views at ``--size``: resized
to 9/8 of the crop (72 px for 64 px crops), then a random crop (training) or the centre crop (testing).

Two references come with it: multinomial logistic regression on similarity-aligned ground-truth landmarks (how
much expression the geometry carries) and identity nearest-neighbour accuracy across clips on 6x6 colour
thumbnails (identity should stay the easy cue). If the supervised network cannot read expression from pixels,
no self-supervised method can show a difference on the corpus. Chance is 12.5% for 8 classes.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch
from PIL import Image
from torch import nn

from data_shards.labels import EXPRESSIONS
from data_shards.synth import EVAL_IDENTITY_OFFSET, SynthConfig, iter_eval_frames
from data_shards.synth.geometry import aligned_shapes
from eval.metrics import accuracy, macro_f1, per_class_recall
from pretrain.model import ResNetBackbone

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def generate(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """Labelled eval frames at 128 px (the stored size), resized to the pre-crop size; landmarks in 128-px units."""
    base = SynthConfig()
    extra = {}
    if args.expression_scale is not None:
        extra["expression_scale"] = args.expression_scale
    if args.zoom is not None:
        extra["zoom"] = args.zoom
    cfg = SynthConfig(
        identities=args.identities,
        clips_per_identity=args.clips,
        seconds=args.seconds,
        seed=args.seed,
        size=128,
        identity_offset=EVAL_IDENTITY_OFFSET,
        intensity=tuple(args.intensity) if args.intensity else base.intensity,
        speech=base.speech if args.speech is None else args.speech,
        **extra,
    )
    resize = round(args.size * 9 / 8)
    images, labels, identities, clips, landmarks = [], [], [], [], []
    for sample in iter_eval_frames(cfg, args.frames_per_clip):
        img = Image.fromarray(sample.image).resize((resize, resize), Image.BILINEAR)
        images.append(np.asarray(img))
        labels.append(sample.meta["expression"])
        identities.append(sample.meta["identity_id"])
        clips.append(sample.meta["clip_id"])
        landmarks.append(sample.meta["landmarks"])
    print(f"config: {dataclasses.asdict(cfg)}")
    return {
        "images": np.stack(images),
        "labels": np.asarray(labels),
        "identities": np.asarray(identities),
        "clips": np.asarray(clips),
        "landmarks": np.asarray(landmarks, np.float64),
    }


def to_tensor(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    return (x - MEAN) / STD


def train_supervised(
    train_x: torch.Tensor, train_y: np.ndarray, test_x: torch.Tensor, args: argparse.Namespace
) -> np.ndarray:
    """ResNet-18 (width 16) + linear head, AdamW + cosine, random crops; returns test predictions."""
    torch.manual_seed(args.seed)
    crop = args.size
    backbone = ResNetBackbone("resnet18", args.width)
    model = nn.Sequential(backbone, nn.Linear(backbone.feature_dim, len(EXPRESSIONS)))
    steps_per_epoch = max(1, len(train_x) // args.batch_size)
    total = steps_per_epoch * args.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total, pct_start=0.1)
    y = torch.from_numpy(train_y)
    gen = torch.Generator().manual_seed(args.seed)
    margin = train_x.shape[-1] - crop
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=gen)
        losses = []
        for step in range(steps_per_epoch):
            idx = order[step * args.batch_size : (step + 1) * args.batch_size]
            dx, dy = torch.randint(0, margin + 1, (2,), generator=gen).tolist()
            xb = train_x[idx, :, dy : dy + crop, dx : dx + crop]
            loss = nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        if (epoch + 1) % max(1, args.epochs // 5) == 0 or epoch + 1 == args.epochs:
            print(f"  epoch {epoch + 1}/{args.epochs}: train loss {np.mean(losses):.3f}", flush=True)
    model.eval()
    off = margin // 2
    with torch.no_grad():
        logits = torch.cat(
            [
                model(test_x[i : i + 256, :, off : off + crop, off : off + crop])
                for i in range(0, len(test_x), 256)
            ]
        )
    return logits.argmax(1).numpy()


def landmark_logreg(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, steps: int = 500
) -> np.ndarray:
    """Multinomial logistic regression by full-batch gradient descent on standardised features."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    classes = len(EXPRESSIONS)
    weights, bias = np.zeros((train_x.shape[1], classes)), np.zeros(classes)
    onehot = np.eye(classes)[train_y]
    for _ in range(steps):
        logits = train_x @ weights + bias
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        grad = (p - onehot) / len(train_x)
        weights -= 0.5 * (train_x.T @ grad + 1e-3 * weights)
        bias -= 0.5 * grad.sum(0)
    return (test_x @ weights + bias).argmax(1)


def identity_nn(images: np.ndarray, identities: np.ndarray, clips: np.ndarray) -> float:
    """1-NN identity accuracy of every frame against frames of *other* clips, on 6x6 colour thumbnails."""
    thumbs = np.stack(
        [np.asarray(Image.fromarray(im).resize((6, 6), Image.BOX), np.float32).ravel() for im in images]
    )
    dist = ((thumbs[:, None] - thumbs[None]) ** 2).sum(-1)
    dist[clips[:, None] == clips[None]] = np.inf  # never match a frame of the same clip
    return float(np.mean(identities[dist.argmin(1)] == identities))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--size", type=int, default=64, help="crop side in px (images are resized to 9/8 first)"
    )
    parser.add_argument("--identities", type=int, default=40, help="split into two disjoint halves")
    parser.add_argument("--clips", type=int, default=4, help="clips per identity")
    parser.add_argument("--seconds", type=float, default=12.0, help="clip length")
    parser.add_argument("--frames-per-clip", type=int, default=8)
    parser.add_argument(
        "--intensity",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        default=None,
        help="SynthConfig.intensity (default: the config's default)",
    )
    parser.add_argument(
        "--expression-scale",
        type=float,
        default=None,
        help="SynthConfig.expression_scale (default: the config's default)",
    )
    parser.add_argument("--zoom", type=float, default=None, help="SynthConfig.zoom (default: the config's)")
    parser.add_argument(
        "--speech", type=float, default=None, help="SynthConfig.speech (default: the config's)"
    )
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--width", type=int, default=16, help="ResNet-18 stem width (demo.yaml: 16)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed and training seed")
    args = parser.parse_args()

    start = time.perf_counter()
    data = generate(args)
    n = len(data["labels"])
    print(
        f"generated {n} frames in {time.perf_counter() - start:.1f} s; class counts "
        f"{np.bincount(data['labels'], minlength=len(EXPRESSIONS)).tolist()}"
    )

    people = np.unique(data["identities"])
    np.random.default_rng(args.seed).shuffle(people)
    train_people = set(people[: len(people) // 2].tolist())
    train = np.array([p in train_people for p in data["identities"]])
    test = ~train
    print(
        f"split: {len(train_people)} train identities ({train.sum()} frames), "
        f"{len(people) - len(train_people)} held-out identities ({test.sum()} frames)"
    )

    features = aligned_shapes(data["landmarks"])
    pred = landmark_logreg(features[train], data["labels"][train], features[test])
    y_test = data["labels"][test]
    k = len(EXPRESSIONS)
    print(
        f"landmark logistic regression (held-out identities): accuracy {100 * accuracy(y_test, pred):.1f}%, "
        f"macro-F1 {100 * macro_f1(y_test, pred, k):.1f}%"
    )
    ident_acc = identity_nn(data["images"], data["identities"], data["clips"])
    print(f"identity 1-NN across clips on 6x6 colour thumbnails: {100 * ident_acc:.1f}%")

    torch.set_num_threads(1)
    x = to_tensor(data["images"])
    start = time.perf_counter()
    pred = train_supervised(
        x[torch.from_numpy(train)], data["labels"][train], x[torch.from_numpy(test)], args
    )
    print(
        f"supervised ResNet-18 (width {args.width}) at {args.size} px, {args.epochs} epochs "
        f"({time.perf_counter() - start:.0f} s): held-out accuracy {100 * accuracy(y_test, pred):.1f}%, "
        f"macro-F1 {100 * macro_f1(y_test, pred, k):.1f}% (chance {100 / k:.1f}%)"
    )
    recall = per_class_recall(y_test, pred, k)
    print(
        "  per-class recall: " + ", ".join(f"{name} {100 * r:.0f}%" for name, r in zip(EXPRESSIONS, recall))
    )


if __name__ == "__main__":
    main()

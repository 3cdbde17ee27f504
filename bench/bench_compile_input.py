"""Does ``torch.compile`` pay on the input side? The two batched input ops, eager vs compiled, one run.

Per op, on the same batch and ``--device``:

* ``ViewAugmenter`` (one view family, ``--batch`` images of S px -> C px crops);
* ``face_swap`` (``--batch`` pairs of toy faces of S px),

for every ``S:C`` of ``--sizes`` (by default the demo model's 72 -> 64 px and the paper's 128 -> 112 px),

each as eager with dynamic shapes (only the rows that drew an op: the CPU default, ``data.shapes=auto``),
eager with static shapes (every row computed, no host sync: the CUDA default), and compiled with inductor
(static shapes with ``dynamic=False``; FaceSwap also dynamic shapes with ``dynamic=True``). Compilation time is
printed apart; the timed loops start after a warm-up. Ratios are against eager static (what compilation would
replace on a GPU) and eager dynamic (the CPU default). Outputs are checked against eager (max abs difference).

    OMP_NUM_THREADS=1 python bench/bench_compile_input.py [--sizes 72:64,128:112] [--batch 32] [--reps 20]
        [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.augment import AugmentConfig, ViewAugmenter  # noqa: E402
from pretrain.faceswap import (  # noqa: E402
    FaceSwapConfig,  # noqa: E402
    face_swap,
    toy_faces,
)


def per_item_ms(fn: Callable[[], torch.Tensor], items: int, reps: int, device: torch.device) -> float:
    """Milliseconds per item over ``reps`` calls after two warm-up calls."""
    for _ in range(2):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / reps / items * 1000


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_compile(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    """First call of a compiled function: its output and seconds (compilation included)."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_views(size: int, crop: int, batch: int, reps: int, device: torch.device) -> dict[str, float]:
    cfg = AugmentConfig(resize=size, crop=crop)
    images, landmarks = toy_faces(batch, size, torch.Generator().manual_seed(0))
    images, landmarks = images.to(device), landmarks.to(device)
    dynamic, static = ViewAugmenter(cfg, static=False), ViewAugmenter(cfg, static=True)
    compiled = torch.compile(static, dynamic=False)

    def call(aug) -> Callable[[], torch.Tensor]:
        def fn() -> torch.Tensor:
            gen = torch.Generator(device=device)
            gen.manual_seed(1)
            return aug(images, landmarks, "first", gen)

        return fn

    out, compile_s = timed_compile(call(compiled))
    return {
        "eager dynamic": per_item_ms(call(dynamic), batch, reps, device),
        "eager static": per_item_ms(call(static), batch, reps, device),
        "compiled static": per_item_ms(call(compiled), batch, reps, device),
        "compile s (static)": compile_s,
        "max abs diff": float((out - call(static)()).abs().max()),
    }


def bench_faceswap(size: int, batch: int, reps: int, device: torch.device) -> dict[str, float]:
    cfg = FaceSwapConfig()
    images, landmarks = toy_faces(2 * batch, size, torch.Generator().manual_seed(1))
    images, landmarks = images.float().to(device), landmarks.to(device)
    args = (images[:batch], landmarks[:batch], images[batch:], landmarks[batch:], cfg)

    def swap(static: bool) -> torch.Tensor:
        return face_swap(*args, static=static)[0]

    compiled_static = torch.compile(lambda: swap(True), dynamic=False)
    compiled_dynamic = torch.compile(lambda: swap(False), dynamic=True)
    out_static, static_s = timed_compile(compiled_static)
    out_dynamic, dynamic_s = timed_compile(compiled_dynamic)
    reference = swap(False)
    return {
        "eager dynamic": per_item_ms(lambda: swap(False), batch, reps, device),
        "eager static": per_item_ms(lambda: swap(True), batch, reps, device),
        "compiled static": per_item_ms(compiled_static, batch, reps, device),
        "compiled dynamic": per_item_ms(compiled_dynamic, batch, reps, device),
        "compile s (static)": static_s,
        "compile s (dynamic)": dynamic_s,
        "max abs diff": float(
            max((out_static - reference).abs().max(), (out_dynamic - reference).abs().max())
        ),
    }


def report(name: str, unit: str, cells: dict[str, float]) -> None:
    print(f"\n{name}, ms per {unit}:")
    for key in ("eager dynamic", "eager static", "compiled static", "compiled dynamic"):
        if key in cells:
            ms = cells[key]
            print(
                f"  {key:<17} {ms:7.3f}   vs eager static {cells['eager static'] / ms:5.2f}x"
                f"   vs eager dynamic {cells['eager dynamic'] / ms:5.2f}x"
            )
    extras = ", ".join(f"{k} {v:.3g}" for k, v in cells.items() if k.startswith(("compile s", "max")))
    print(f"  ({extras})")


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"72:64,128:112"`` -> [(72, 64), (128, 112)]; a crop must fit its frame."""
    sizes = []
    for item in text.split(","):
        size, _, crop = item.partition(":")
        if not (size.isdigit() and crop.isdigit()) or not 0 < int(crop) <= int(size):
            raise SystemExit(f"--sizes: expected FRAME:CROP pairs like 72:64 (crop <= frame), got {item!r}")
        sizes.append((int(size), int(crop)))
    return sizes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="72:64,128:112", help="comma-separated frame:crop sizes in px")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    device = torch.device(args.device)
    torch.set_num_threads(1)
    # The dynamic path reads box sizes on the host: dynamo's graph-break warnings are expected, not news.
    torch._logging.set_logs(dynamo=logging.ERROR)
    print(f"torch {torch.__version__}, device {device}, batch {args.batch}, {args.reps} timed calls per cell")
    for size, crop in parse_sizes(args.sizes):
        views = bench_views(size, crop, args.batch, args.reps, device)
        report(f"ViewAugmenter (one family, {size} px -> {crop} px)", "image", views)
        report(f"face_swap ({size} px)", "pair", bench_faceswap(size, args.batch, args.reps, device))


if __name__ == "__main__":
    main()

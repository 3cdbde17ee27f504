"""Where a CPU rank's input time goes: milliseconds of one core per training image, stage by stage.

The torch pipeline (``data.pipeline=torch``) with one rank's share of ``bench/bench_step.py``'s configuration
(the paper config at one of its sizes, FaceSwap from the first step, stream donors), run in this process on one
thread, one batch at a time, on SynthFace clip shards (128 px frames) written to a temp dir. Stages are the
pipeline's own calls, timed by wrapping them (no copy of their logic):

* read: shard bytes -> tar members -> samples -> shuffle -> clip groups (``clip_groups``);
* host: the rows' bytes and landmarks (``prepare``, minus decode);
* decode: libjpeg + resize to ``data.image_size`` (``device_images``);
* faceswap, views, descriptors: the three device-side steps of ``finish``;
* rest: what ``finish`` does around them (the step's donor set from the donor stream included).

On 2 CPU ranks with one core each, input work shares the cores with the training step: with ``c`` ms of
compute per image (the compute-only ceiling of ``bench_step.py``: ``c = cores * 1000 / ceiling img/s``) and
``i`` ms of input per image, the end-to-end step can reach at most ``c / (c + i)`` of the ceiling. Pass the
ceiling with ``--ceiling`` to print that bound.

    OMP_NUM_THREADS=1 python bench/bench_input_budget.py [--size r18w16-64|r50-112] [--batches 24]
        [--ceiling IMG_S]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_input import make_shards  # noqa: E402
from bench_step import SIZES, load_cfg, run_overrides  # noqa: E402

from pretrain.config import resolve_global_batch  # noqa: E402

STAGES = ("read", "host", "decode", "faceswap", "views", "descriptors", "rest")


class StageClock:
    """Seconds spent inside wrapped callables, by stage name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, stage: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - start

        return timed


def measure(url: str, size: str, clips: int, batches: int) -> tuple[dict[str, float], int]:
    """Stage seconds and the number of images over ``batches`` batches of ``clips`` clips (after 3 warm-up
    batches)."""
    from pretrain.pipelines import make_batch_pipeline

    overrides = run_overrides(
        size, clips, [f"data.url={url}", "data.shuffle_buffer=16", "data.equalize=repeat"]
    )
    cfg = resolve_global_batch(load_cfg(overrides), 1)
    pipe = make_batch_pipeline(cfg, 0, 1, "cpu")
    clock = StageClock()
    pipe.device_images = clock.wrap("decode", pipe.device_images)
    pipe.views = clock.wrap("views", pipe.views)
    if pipe.swap is not None:
        pipe.swap = clock.wrap("faceswap", pipe.swap)
    if pipe.descriptor is not None:
        pipe.descriptor = clock.wrap("descriptors", pipe.descriptor)
    groups = pipe.clip_groups()
    images = 0
    for step in range(3 + batches):
        if step == 3:
            clock.seconds.clear()
        start = time.perf_counter()
        group, _ = next(groups)  # (group, stream state after it)
        clock.seconds["read"] += time.perf_counter() - start
        start = time.perf_counter()
        host = pipe.prepare(group)
        clock.seconds["host"] += time.perf_counter() - start
        start = time.perf_counter()
        batch = pipe.finish(host)
        clock.seconds["finish"] += time.perf_counter() - start
        images += batch.images.shape[0] if step >= 3 else 0
    inner = sum(clock.seconds[s] for s in ("decode", "faceswap", "views", "descriptors"))
    clock.seconds["rest"] = clock.seconds.pop("finish") - inner
    pipe.close()
    return dict(clock.seconds), images


def budget_table(seconds: dict[str, float], images: int, ceiling: float | None, cores: int) -> str:
    """The per-stage table (ms per image and share) and, given the ceiling's img/s, the c / (c + i) bound."""
    total = sum(seconds.get(s, 0.0) for s in STAGES)
    lines = ["| stage | ms per image | share |", "|---|---|---|"]
    for stage in STAGES:
        ms = 1000 * seconds.get(stage, 0.0) / images
        lines.append(f"| {stage} | {ms:.3f} | {100 * seconds.get(stage, 0.0) / total:.0f}% |")
    input_ms = 1000 * total / images
    lines.append(f"| **input, all stages** | **{input_ms:.3f}** | 100% |")
    if ceiling:
        compute_ms = cores * 1000 / ceiling
        lines.append(
            f"\ncompute per image at the ceiling ({ceiling:.1f} img/s on {cores} cores): {compute_ms:.3f} ms -> "
            f"with input sharing the cores, the trainer can reach at most "
            f"{compute_ms / (compute_ms + input_ms):.2f} of the ceiling"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="r18w16-64", choices=sorted(SIZES))
    parser.add_argument(
        "--clips", type=int, default=4, help="clips per batch, 4 images each (bench_step.py: 4 per rank)"
    )
    parser.add_argument("--batches", type=int, default=24, help="timed batches")
    parser.add_argument(
        "--ceiling", type=float, default=None, help="bench_step.py's (a) img/s, for the bound"
    )
    parser.add_argument("--cores", type=int, default=2, help="cores the ceiling was measured on")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        url = make_shards(f"{tmp}/clips", max(16, 4 * args.clips))
        seconds, images = measure(url, args.size, args.clips, args.batches)
    print(f"\n{args.size} ({' '.join(SIZES[args.size])}), {images} images, one thread:\n")
    print(budget_table(seconds, images, args.ceiling, args.cores))


if __name__ == "__main__":
    main()

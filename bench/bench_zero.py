"""ZeRO 0/1/2 overhead against plain torch DDP as a function of parameter count, on 2 CPU ranks.

Each (size, stage) cell is one bench/bench_train.py run: the DDP loop and the DeepSpeed engine on the same
fixed batch, alternating in blocks in the same processes, so the overhead is a ratio within one run.
Overhead % = (DeepSpeed ms/step / DDP ms/step - 1) x 100.

    python bench/bench_zero.py                        # 0.8 M, 11 M, 23.5 M parameters x ZeRO 0, 1, 2
    python bench/bench_zero.py --quick                # smallest model only, few steps (smoke)
    python bench/bench_zero.py --ds-json tuned.json   # the same with ZeRO tuning merged in (overlap_comm...)
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name -> (arch, width, crop): backbone sizes 0.8 M (the demo model), 11 M and 23.5 M parameters.
SIZES = {"r18w16": ("resnet18", 16, 64), "r18w64": ("resnet18", 64, 64), "r50": ("resnet50", 64, 64)}
LINE = re.compile(r"^\s+(ddp|deepspeed)\s+([\d.]+) images/s\s+([\d.]+) ms/step")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None, help=f"comma list of {list(SIZES)} (default all; --quick: first)")
    p.add_argument("--stages", default="0,1,2")
    p.add_argument("--steps", type=int, default=None, help="timed steps per loop (default 10, --quick 4)")
    p.add_argument("--batch-clips", type=int, default=4, help="clips per rank (4 images each)")
    p.add_argument(
        "--ds-json", default=None,
        help="DeepSpeed JSON merged into the engine's config (bench_train.py --ds-json), e.g. ZeRO bucket tuning",
    )  # fmt: skip
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    args.sizes = args.sizes.split(",") if args.sizes else (list(SIZES)[:1] if args.quick else list(SIZES))
    if unknown := [s for s in args.sizes if s not in SIZES]:
        p.error(f"--sizes: unknown {unknown}; choose from {list(SIZES)}")
    args.stages = [int(s) for s in args.stages.split(",")]
    if bad := [s for s in args.stages if s not in (0, 1, 2)]:
        p.error(f"--stages: {bad} not in 0, 1, 2")
    args.steps = args.steps or (4 if args.quick else 10)
    return args


def parse_bench_train(text: str) -> dict[str, float]:
    """bench_train.py's output -> {'ddp_ms': .., 'deepspeed_ms': ..}; ValueError naming what is missing."""
    found = {}
    for line in text.splitlines():
        if m := LINE.match(line):
            found[f"{m.group(1)}_ms"] = float(m.group(3))
    missing = {"ddp_ms", "deepspeed_ms"} - found.keys()
    if missing:
        raise ValueError(f"bench_train.py output lacks {sorted(missing)} lines:\n{text[-2000:]}")
    return found


def overhead_pct(ddp_ms: float, deepspeed_ms: float) -> float:
    return (deepspeed_ms / ddp_ms - 1.0) * 100.0


def param_count(arch: str, width: int) -> int:
    from common.configio import load_config
    from pretrain.config import PretrainConfig
    from pretrain.model import ContrastiveEncoder

    cfg = load_config(PretrainConfig, None, [f"model.arch={arch}", f"model.width={width}"])
    return sum(p.numel() for p in ContrastiveEncoder(cfg.model).parameters())


def format_table(cells: list[dict]) -> str:
    """Markdown: one row per (size, stage) with parameters, DDP and DeepSpeed ms/step, and the overhead %."""
    out = [
        "| model | parameters (backbone + projector) | ZeRO stage | DDP ms/step | DeepSpeed ms/step | overhead |",
        "|---|---|---|---|---|---|",
    ]
    for c in cells:
        out.append(
            f"| {c['size']} | {c['params'] / 1e6:.1f} M | {c['stage']} | {c['ddp_ms']:.1f} | "
            f"{c['deepspeed_ms']:.1f} | {overhead_pct(c['ddp_ms'], c['deepspeed_ms']):+.1f}% |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    cells = []
    for size in args.sizes:
        arch, width, crop = SIZES[size]
        params = param_count(arch, width)
        for stage in args.stages:
            cmd = [sys.executable, str(REPO / "bench/bench_train.py"), "--arch", arch, "--width", str(width),
                   "--crop", str(crop), "--batch-clips", str(args.batch_clips), "--zero-stage", str(stage),
                   "--steps", str(args.steps), "--block", str(max(1, args.steps // 2))]  # fmt: skip
            if args.ds_json:
                cmd += ["--ds-json", args.ds_json]
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if proc.returncode != 0:
                print(
                    f"error: {' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}",
                    file=sys.stderr,
                )
                return 1
            cell = {"size": size, "params": params, "stage": stage, **parse_bench_train(proc.stdout)}
            print(f"  {size} ZeRO-{stage}: DDP {cell['ddp_ms']:.1f} ms, DeepSpeed {cell['deepspeed_ms']:.1f} ms",
                  flush=True)  # fmt: skip
            cells.append(cell)
    tuned = f", DeepSpeed JSON {args.ds_json}" if args.ds_json else ""
    print(
        f"\n2 CPU ranks, {4 * args.batch_clips} images/rank, {args.steps} timed steps per loop, fp32{tuned}"
    )
    print(format_table(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())

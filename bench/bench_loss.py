"""Cost of the contrastive loss vs global batch: one rank's rows (W ranks simulated) vs the full matrix.

For each global batch N (rows, D-dim embeddings, SSL-FER layout with MaskFN pick), measures forward+backward of
``info_nce`` over (a) the N/W rows one rank computes in ``DistributedInfoNCE`` against all N columns and
(b) all N rows (what a single process, or a gather-everything design, computes). The gathers themselves are
not timed (W=1 process). Each case runs in a forked child so its peak memory is its own: peak RSS (VmHWM,
reset through /proc/self/clear_refs after a warm-up) minus the RSS before the case, so it includes the
similarity matrices, masks and autograd buffers. Prints times, peaks and full/local ratios.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_loss.py [--world 8] [--dim 128] [--sizes 64,256,1024,2048]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.loss import batch_layout, info_nce  # noqa: E402


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return -1


def _step(z: torch.Tensor, positive, groups, desc, rows) -> None:
    z = z.detach().requires_grad_(True)
    info_nce(z, positive, 0.07, desc, group_id=groups, row_indices=rows).loss.backward()


def _case(n: int, dim: int, rows_count: int, repeats: int) -> dict:
    torch.manual_seed(0)
    positive, groups = batch_layout(n // 4, "sslfer")
    z = torch.randn(n, dim)
    desc = torch.randn(n, 84)
    rows = torch.arange(rows_count)
    small_pos, small_groups = batch_layout(2, "sslfer")
    _step(
        torch.randn(8, dim), small_pos, small_groups, torch.randn(8, 84), torch.arange(2)
    )  # warm code paths
    peak = -1
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status("VmRSS")
        _step(z, positive, groups, desc, rows)
        peak = _status("VmHWM") - base
    except OSError:
        _step(z, positive, groups, desc, rows)
    start = time.perf_counter()
    for _ in range(repeats):
        _step(z, positive, groups, desc, rows)
    return {"seconds": (time.perf_counter() - start) / repeats, "peak_bytes": peak}


def run_isolated(n: int, dim: int, rows_count: int, repeats: int) -> dict:
    """Run one case in a forked child (fresh peak-memory counter) and return its figures."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            result = _case(n, dim, rows_count, repeats)
        except BaseException as err:  # report, never fall through into the parent's code
            result = {"error": repr(err)}
        os.write(write_fd, json.dumps(result).encode())
        os._exit(0)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    os.waitpid(pid, 0)
    result = json.loads(b"".join(chunks))
    if "error" in result:
        raise RuntimeError(f"case N={n} rows={rows_count} failed: {result['error']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--sizes", default="64,256,1024,2048")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print(
        f"InfoNCE+MaskFN forward+backward, D={args.dim}, W={args.world} simulated, torch {torch.__version__}"
    )
    header = (
        f"{'N':>6} {'local ms':>9} {'full ms':>9} {'time x':>7} {'local MB':>9} {'full MB':>9} {'mem x':>7}"
    )
    print(header)
    for n in [int(s) for s in args.sizes.split(",")]:
        if n % (4 * args.world):
            raise SystemExit(f"--sizes: {n} must be a multiple of 4 x world ({4 * args.world})")
        local = run_isolated(n, args.dim, n // args.world, args.repeats)
        full = run_isolated(n, args.dim, n, args.repeats)
        lm, fm = local["peak_bytes"] / 1e6, full["peak_bytes"] / 1e6
        mem_ratio = fm / lm if lm > 0 else float("nan")
        print(
            f"{n:>6} {local['seconds'] * 1e3:>9.2f} {full['seconds'] * 1e3:>9.2f} "
            f"{full['seconds'] / local['seconds']:>7.2f} {lm:>9.1f} {fm:>9.1f} {mem_ratio:>7.2f}"
        )


if __name__ == "__main__":
    main()

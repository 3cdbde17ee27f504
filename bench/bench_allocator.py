"""Page faults and time per CPU batch with and without ``data.keep_freed_memory`` (pretrain/allocator.py).

    OMP_NUM_THREADS=1 python bench/bench_allocator.py [--batches 10]

Each mode runs in a fresh process (the setting is process-wide): a batch of FaceSwap + view augmentation on 64
toy faces at 128 px, the CPU input path's own allocation pattern, in a worker thread as the pipelines run;
minor page faults and milliseconds per batch after a 3-batch warm-up. Fault counts depend on the machine's
state (transparent huge pages make the default path fault far less), so they are a benchmark figure, not a
test: ``tests/test_allocator.py`` checks the mechanism itself.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = """
import resource, sys, threading, time, torch
torch.set_num_threads(1)
if sys.argv[1] == "keep":
    from pretrain.allocator import keep_freed_memory
    assert keep_freed_memory()
from pretrain.augment import ViewAugmenter
from pretrain.faceswap import FaceSwap, toy_faces
images, landmarks = toy_faces(64, 128, torch.Generator().manual_seed(0))
identity, swap, views = torch.arange(64), FaceSwap(), ViewAugmenter()
def batch(seed):
    out = swap(images, landmarks, identity, torch.Generator().manual_seed(seed))
    views(out.images, out.landmarks, "second", torch.Generator().manual_seed(seed))
def run(count):
    for seed in range(3):
        batch(seed)
    faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    for seed in range(count):
        batch(seed)
    ms = (time.perf_counter() - start) / count * 1e3
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / count, ms)
worker = threading.Thread(target=run, args=(int(sys.argv[2]),))
worker.start()
worker.join()
"""


def measure(mode: str, batches: int) -> tuple[float, float]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode, str(batches)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    faults, ms = out.stdout.split()[-2:]
    return float(faults), float(ms)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=10)
    args = parser.parse_args(argv)
    rows = {mode: measure(mode, args.batches) for mode in ("default", "keep")}
    print(f"{'glibc heap':>22} {'faults/batch':>13} {'ms/batch':>9}")
    for mode, label in (("default", "default"), ("keep", "keep_freed_memory")):
        faults, ms = rows[mode]
        print(f"{label:>22} {faults:>13.0f} {ms:>9.1f}")
    print(f"time ratio keep/default: {rows['keep'][1] / rows['default'][1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

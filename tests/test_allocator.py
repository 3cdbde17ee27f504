"""pretrain/allocator.py: glibc keeps freed multi-megabyte tensor blocks in the heap for reuse.

The mechanism is checked directly, in a fresh process each (the setting is process-wide), in a worker thread as
the pipelines run: where an 8 MiB tensor's memory comes from (glibc's own counters, ``mallinfo2``) and whether
it stays in the heap once freed. Page faults and time per batch are machine-dependent (transparent huge pages
change the count several-fold) and live in ``bench/bench_allocator.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = """
import ctypes, json, sys, threading, torch
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
applied = None
if sys.argv[1] == "keep":
    from pretrain.allocator import keep_freed_memory
    applied = [keep_freed_memory(), keep_freed_memory()]
result = {"applied": applied}
def run():
    before = libc.mallinfo2()
    block = torch.empty(8 << 20, dtype=torch.uint8)
    block.fill_(1)
    during = libc.mallinfo2()
    del block
    after = libc.mallinfo2()
    result["mmapped_mib"] = (during.hblkhd - before.hblkhd) / 2**20  # served by mmap: unmapped on free
    result["kept_free_mib"] = (after.fordblks - before.fordblks) / 2**20  # freed, still in the heap
worker = threading.Thread(target=run)
worker.start()
worker.join()
print(json.dumps(result))
"""


def _heap(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], cwd=REPO, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.splitlines()[-1])


def test_freed_tensor_memory_stays_in_the_heap_instead_of_going_back_to_the_kernel():
    default, kept = _heap("default"), _heap("keep")
    # glibc's default: a block this large is mmapped, and unmapped again on free (faulted in anew next time)
    assert default["mmapped_mib"] >= 8 and default["kept_free_mib"] < 1, default
    # with the setting: served from the heap, and still there once freed, ready for the next op
    assert kept["applied"] == [True, True], kept  # applied, and idempotent
    assert kept["mmapped_mib"] == 0 and kept["kept_free_mib"] >= 7, kept

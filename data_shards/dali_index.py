"""DALI index files for shards: ``fn.readers.webdataset`` reads a shard with its ``.idx`` without scanning it.

Without an index DALI infers one by reading every shard in full when a pipeline is built. The shard writer
therefore writes ``shard-NNNNNN.idx`` beside each ``shard-NNNNNN.tar`` (DALI's v1.2 format: a header line
``v1.2 <samples>``, then one line per sample listing each member as ``<ext> <offset> <size> <name>``), grouped
by the same rule DALI's own ``wds2idx`` uses (the key is the path up to the first dot of the file name).

Training does not read shards with DALI's reader: the clip sampler needs a whole clip per sample, chooses
frames inside it, and keeps an exact, resumable stream position per rank (docs/pretraining.md). The index files
serve users who feed the same shards to their own DALI pipelines.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

from data_shards.tar_stream import member_offsets

VERSION = "v1.2"


def _split(name: str) -> tuple[str, str]:
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


def index_text(stream: BinaryIO) -> str:
    """The DALI index of the uncompressed tar read from ``stream``."""
    samples: list[list[tuple[str, int, int, str]]] = []
    last = None
    for name, offset, size in member_offsets(stream):
        base, ext = _split(name)
        if not base or base.endswith("/") or not ext:
            continue
        if base != last:
            samples.append([])
            last = base
        samples[-1].append((ext, offset, size, name))
    lines = [f"{VERSION} {len(samples)}"]
    lines += [" ".join(f"{e} {o} {s} {n}" for e, o, s, n in sample) for sample in samples]
    return "\n".join(lines) + "\n"


def write_index(tar_path: str | Path, idx_path: str | Path | None = None) -> Path:
    """Write ``tar_path``'s index next to it (``.idx``) or to ``idx_path``."""
    tar_path = Path(tar_path)
    idx_path = Path(idx_path) if idx_path else tar_path.with_suffix(".idx")
    with open(tar_path, "rb") as stream:
        idx_path.write_text(index_text(stream))
    return idx_path

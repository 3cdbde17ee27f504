"""What the tests that start real training runs share: a tiny model/data setting, a small SynthFace clip set
and the launcher environment."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# Tiny and fast: 64 px frames, 48 px crops, an 8-wide ResNet-18, 2 clips per rank.
TINY_OVERRIDES = [
    "data.image_size=64",
    "augment.resize=64",
    "augment.crop=48",
    "model.width=8",
    "model.projector_dims=[32,16]",
    "data.batch_clips=2",
    "data.shuffle_buffer=4",
    "device=cpu",
]


def launcher_env(**extra: str) -> dict[str, str]:
    """Environment for `deepspeed`/`torchrun`/`python` runs started by tests.

    The venv's bin comes first on PATH, as in the Makefile: one ninja for every process, or DeepSpeed's
    shared shm_comm op is rebuilt (minutes) whenever two ninjas alternate. Test-only fault hooks never leak.
    """
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR") or str(REPO / ".cache/torch_extensions"),
        PYTHONPATH=str(REPO),
        PYTHONUNBUFFERED="1",
        PYTHONFAULTHANDLER="1",  # a rank that aborts in C++ still prints every thread's Python stack
        PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}",
    )
    for key in [k for k in env if k.startswith("SSLFER_INJECT_")]:
        del env[key]
    env.update(extra)
    return env


def write_synth_clips(url: Path | str) -> str:
    """16 SynthFace clips (8 identities, 6 s, 64 px, ~25 frames) in 4 shards at ``url``: 8 steps per epoch on
    1 rank, 4 on 2 ranks."""
    from data_shards.synth import SynthConfig, iter_clips
    from data_shards.write import ShardWriter

    cfg = SynthConfig(identities=8, clips_per_identity=2, seconds=6.0, size=64, seed=0)
    with ShardWriter(str(url), kind="clips", split="pretrain", generator={"synth": True}, max_samples=4) as w:
        for clip in iter_clips(cfg):
            w.write_clip(clip)
    return str(url)

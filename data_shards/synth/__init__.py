"""SynthFace: a procedural talking-face generator with known, independent identity and expression factors.

    from data_shards.synth import SynthConfig, iter_clips, iter_eval_frames, render_contact_sheet

Pretraining identities are 0..N-1 and evaluation identities start at ``EVAL_IDENTITY_OFFSET`` (see
``identity_range``), so the two never share a person.
"""

from __future__ import annotations

from data_shards.synth.clip import (
    ClipSample,
    FrameSample,
    generate_clip,
    iter_clips,
    iter_eval_frames,
    simulate_clip,
)
from data_shards.synth.config import EVAL_IDENTITY_OFFSET, SynthConfig, identity_range
from data_shards.synth.contact_sheet import render_contact_sheet
from data_shards.synth.expression import AU_NAMES

__all__ = [
    "AU_NAMES",
    "EVAL_IDENTITY_OFFSET",
    "ClipSample",
    "FrameSample",
    "SynthConfig",
    "generate_clip",
    "identity_range",
    "iter_clips",
    "iter_eval_frames",
    "render_contact_sheet",
    "simulate_clip",
]

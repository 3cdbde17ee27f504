"""Benchmark the evaluation's two hot paths: frozen feature extraction (images/s) and probe fits per second.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_eval.py [--images 256] [--arch resnet18 --width 16]

Features: JPEG decode + resize/centre crop + backbone forward, on CUDA when present, else the CPU; the decode
share is measured separately so a slow number can be attributed. Probes: one L-BFGS logistic fit, one ridge
fit and one identity-leakage evaluation on random features of the sizes given.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _rate(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return repeats / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--samples", type=int, default=2000, help="probe: feature vectors")
    parser.add_argument("--dim", type=int, default=512, help="probe: feature size")
    args = parser.parse_args(argv)

    from eval.data import load_frames, write_toy_frames
    from eval.features import FeatureConfig, decode_batch, resolve_device, throughput
    from eval.probes import ProbeConfig, fit_logistic, fit_ridge, identity_leakage
    from pretrain.model import ModelConfig, build_backbone, save_backbone

    cfg = FeatureConfig(batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        ids = max(2, args.images // 32)
        url = write_toy_frames(
            str(Path(tmp) / "toy"), identities=ids, per_identity=args.images // ids, size=128
        )
        jpegs = load_frames(url).jpegs
        ckpt = save_backbone(
            build_backbone(ModelConfig(arch=args.arch, width=args.width)), Path(tmp) / "b.pt"
        )
        decode_rate = len(jpegs) * _rate(lambda: decode_batch(jpegs, cfg.resize, cfg.crop), 1)
        feature_rate = throughput(str(ckpt), jpegs, cfg)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.samples, args.dim)).astype(np.float32)
    y = rng.integers(0, 8, size=args.samples)
    va = rng.uniform(-1, 1, size=(args.samples, 2))
    identity = np.repeat([f"id{i}" for i in range(args.samples // 20)], 20).astype(object)
    half = np.arange(args.samples)
    gallery, probe = half[half % 20 < 10], half[half % 20 >= 10]
    probe_cfg = ProbeConfig()
    logistic = _rate(lambda: fit_logistic(x, y, 8, 1e-3, 0, probe_cfg.lbfgs_max_iter), 3)
    ridge = _rate(lambda: fit_ridge(x, va, 1.0), 10)
    leakage = _rate(lambda: identity_leakage(x, identity, gallery, probe, probe_cfg, 0), 3)

    device = resolve_device(cfg.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    print(f"features  {args.arch} width {args.width}, {len(jpegs)} images of 128 px -> crop {cfg.crop}:")
    print(f"  decode + crop only          {decode_rate:9.1f} images/s")
    print(f"  decode + crop + forward     {feature_rate:9.1f} images/s")
    print(f"probes    {args.samples} x {args.dim} features, 8 classes:")
    print(f"  logistic (L-BFGS) fits      {logistic:9.2f} /s")
    print(f"  ridge V/A fits              {ridge:9.2f} /s")
    print(f"  identity leakage evals      {leakage:9.2f} /s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

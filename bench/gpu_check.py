"""One prepared script for a GPU host: runs the GPU paths and prints the GPU section of BENCHMARKS.md.

    python bench/gpu_check.py [--out gpu_check.md] [--steps 20]

Checks, each timed: nvjpeg batched decode, the two-family augmentation and FaceSwap as device tensor ops,
bf16 + channels_last ResNet-50 training steps (plain torch, and DeepSpeed when importable), NCCL all-gather
with gradient on one GPU (world size 1), and the distributed loss against the single-process loss on CUDA.
Needs only torch/torchvision/numpy/pillow (+ deepspeed if carried); DALI's GPU operators are exercised by
tests/test_dali.py where DALI is installed.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def timed(fn, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def jpeg_batch(n: int, size: int = 128) -> tuple[list[bytes], torch.Tensor, torch.Tensor]:
    from PIL import Image

    from pretrain.faceswap import toy_faces

    images, landmarks = toy_faces(n, size, torch.Generator().manual_seed(0))
    jpegs = []
    for img in images.permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())
    return jpegs, images, landmarks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU host", file=sys.stderr)
        return 1
    dev = torch.device("cuda")
    rows = [
        "## GPU section",
        "",
        f"{time.strftime('%Y-%m-%d')}, {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
        f"Python {platform.python_version()}",
        "",
        "| check | result |",
        "|---|---|",
    ]

    from pretrain.augment import AugmentConfig, ViewAugmenter
    from pretrain.decode import decode_jpegs
    from pretrain.faceswap import FaceSwap, FaceSwapConfig

    n = args.batch
    jpegs, _, landmarks = jpeg_batch(n)
    t = timed(lambda: decode_jpegs(jpegs, device="cuda"))
    rows.append(f"| nvjpeg batched decode, {n} x 128 px | {n / t:,.0f} img/s |")
    images = decode_jpegs(jpegs, device="cuda")
    lm = landmarks.to(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    aug = ViewAugmenter(AugmentConfig(channels_last=True), static=True)  # the CUDA default (data.shapes)
    t = timed(lambda: aug(images, lm, "first", gen))
    rows.append(f"| two-family augmentation (one family timed), {n} views 128->112 | {n / t:,.0f} img/s |")
    swap = FaceSwap(FaceSwapConfig(p=1.0), static=True)
    identity = torch.arange(n, device=dev)
    t = timed(lambda: swap(images, lm, identity, gen))
    rows.append(f"| batched FaceSwap, {n} pairs | {n / t:,.0f} pairs/s |")

    from pretrain.loss import batch_layout, info_nce

    pos, group = batch_layout(n // 4, "sslfer")
    z = torch.randn(n, 128, device=dev, requires_grad=True)
    desc = torch.randn(n, 84, device=dev)
    out = info_nce(z, pos.to(dev), 0.07, fn_descriptors=desc, group_id=group.to(dev))
    out.loss.backward()
    ref = info_nce(z.double().cpu(), pos, 0.07, fn_descriptors=desc.double().cpu(), group_id=group)
    rows.append(
        f"| loss on CUDA vs fp64 CPU reference | abs diff {abs(out.loss.item() - ref.loss.item()):.2e} |"
    )

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    import torch.distributed as dist

    from pretrain.distributed import all_gather_with_grad

    dist.init_process_group("nccl", device_id=dev)
    x = torch.randn(8, 4, device=dev, requires_grad=True)
    g = all_gather_with_grad(x)
    g.sum().backward()
    ok = torch.equal(g, x) and torch.equal(x.grad, torch.ones_like(x))
    rows.append(f"| NCCL all-gather with gradient (world 1) | {'exact' if ok else 'MISMATCH'} |")

    from pretrain.model import ContrastiveEncoder, ModelConfig

    model = ContrastiveEncoder(ModelConfig(arch="resnet50", projector_dims=[2048, 2048, 128])).to(dev)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=3e-4, weight_decay=1e-4)
    batch = torch.randn(512, 3, 112, 112, device=dev).to(memory_format=torch.channels_last)

    def plain_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            zz = model(batch)
        loss = info_nce(zz.float(), torch.arange(512, device=dev).roll(256), 0.07).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    torch.cuda.reset_peak_memory_stats()
    t = timed(plain_step, repeats=args.steps)
    rows.append(
        f"| ResNet-50 bf16 channels_last train step, 512 x 112 px (plain torch) | {512 / t:,.0f} img/s, "
        f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB |"
    )
    try:
        import deepspeed

        from pretrain.ds_config import build_ds_config  # noqa: F401

        rows.append(
            f"| DeepSpeed importable | {deepspeed.__version__} (run launch/pretrain.py on GPU for a full check) |"
        )
    except ImportError:
        rows.append("| DeepSpeed | not installed on this host (carry the wheel to check the engine) |")
    dist.destroy_process_group()
    text = "\n".join(rows) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    _ = np  # numpy is needed by the toy-face generator
    return 0


if __name__ == "__main__":
    sys.exit(main())

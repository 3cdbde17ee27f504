"""Training-step throughput and peak memory: DeepSpeed engine vs a plain torch DDP loop, side by side.

Same model (ContrastiveEncoder), same fixed batch, same loss (all-gathered InfoNCE + MaskFN), same Adam, in the
same run on the same ranks; the two loops alternate in blocks so machine noise hits both. Only the training
step is timed (the input pipeline has its own benchmark). Prints images/s (global) and peak memory per rank for
each, and the overhead ratio DDP images/s / DeepSpeed images/s (> 1: DeepSpeed is slower).

    python bench/bench_train.py                       # starts itself with torchrun on 2 CPU ranks
    python bench/bench_train.py --nproc 1 --device cuda --width 64 --arch resnet50 --crop 112 --batch-clips 32

Memory per rank, two figures: (1) peak step memory: CUDA max_memory_allocated during the timed steps on GPUs;
on CPU the peak resident set size sampled during the steps above the level before them (activations and
temporaries; both models live in one process, so allocator reuse makes this a lower bound); (2) training
state: bytes of the distinct tensors held by the model and optimizer (weights, grads, Adam moments, ZeRO's
flat buffers and partitions) - where ZeRO's partitioning shows.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="ranks (torchrun --nproc_per_node)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument(
        "--batch-clips", type=int, default=8, help="clips per rank; 4 images each ([A, NA, P, NP])"
    )
    p.add_argument("--zero-stage", type=int, default=1, choices=[0, 1, 2])
    p.add_argument("--precision", choices=["fp32", "bf16_autocast", "bf16_weights"], default="fp32")
    p.add_argument("--steps", type=int, default=20, help="timed steps per loop")
    p.add_argument(
        "--ds-json", default=None,
        help="a DeepSpeed JSON merged over the project's config as launch/pretrain.py merges --deepspeed_config "
        "(e.g. ZeRO tuning: zero_optimization.overlap_comm, reduce_bucket_size)",
    )  # fmt: skip
    p.add_argument("--block", type=int, default=5, help="steps per alternation block")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


class PeakRSS:
    """Samples this process's resident memory in a thread; ``peak`` above the level at ``start``."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.base = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = self.proc.memory_info().rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def state_bytes(*roots) -> int:
    """Bytes of distinct tensor storages reachable from ``roots`` (modules, optimizers, their attributes).

    Counts parameters, gradients, optimizer moments, ZeRO's flat buffers and fp32 partitions once each.
    """
    import torch

    seen: dict[int, int] = {}
    visited: set[int] = set()

    def walk(obj, depth: int) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.device.type != "meta" and obj.untyped_storage().nbytes():
                seen[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
            if obj.grad is not None:
                walk(obj.grad, depth)
            return
        if depth > 4 or id(obj) in visited or isinstance(obj, str | bytes | int | float | bool | type(None)):
            return
        visited.add(id(obj))
        if isinstance(obj, torch.nn.Module):
            for t in list(obj.parameters()) + list(obj.buffers()):
                walk(t, depth)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v, depth + 1)
        elif isinstance(obj, list | tuple):
            for v in obj:
                walk(v, depth + 1)
        elif isinstance(obj, torch.optim.Optimizer):
            walk(obj.state, depth + 1)
            walk(obj.param_groups, depth + 1)
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("deepspeed"):
            for v in vars(obj).values():
                walk(v, depth + 1)

    for root in roots:
        walk(root, 0)
    return sum(seen.values())


def bench_config(args):
    """The project config both loops train under."""
    from common.configio import load_config
    from pretrain.config import PretrainConfig

    return load_config(
        PretrainConfig,
        None,
        [f"model.arch={args.arch}", f"model.width={args.width}", f"data.batch_clips={args.batch_clips}",
         f"zero_stage={args.zero_stage}", f"precision={args.precision}", f"device={args.device}"],
    )  # fmt: skip


def engine_config(args, cfg, world: int) -> dict:
    """The DeepSpeed engine's config: the project's, with ``--ds-json`` merged as the trainer merges it."""
    from pretrain.ds_config import build_ds_config, load_user_config, merge_user_config

    config = build_ds_config(cfg, world)
    if args.ds_json:
        config = merge_user_config(config, load_user_config(args.ds_json), cfg, world, args.ds_json)
    return config


def worker(args) -> None:
    import deepspeed
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    from pretrain import distributed
    from pretrain.descriptors import landmark_descriptor
    from pretrain.loss import DistributedInfoNCE, batch_layout
    from pretrain.model import ContrastiveEncoder

    cuda = args.device == "cuda"
    distributed.init_distributed("nccl" if cuda else "gloo")
    # one rank: DeepSpeed (and DDP) still need a process group, as in the trainer
    if not distributed.is_initialized():
        distributed.single_process_env()
        deepspeed.init_distributed("nccl" if cuda else "gloo", auto_mpi_discovery=False)
    rank, world = distributed.get_rank(), distributed.get_world_size()
    device = torch.device("cuda", distributed.get_local_rank()) if cuda else torch.device("cpu")
    cfg = bench_config(args)
    dtype = torch.bfloat16 if args.precision == "bf16_weights" else torch.float32
    autocast = args.precision == "bf16_autocast"  # both sides: fp32 weights, bf16 autocast forward

    gen = torch.Generator().manual_seed(rank)
    n = 4 * args.batch_clips
    images = torch.randn(n, 3, args.crop, args.crop, generator=gen).to(device, dtype)
    landmarks = torch.rand(n, 68, 2, generator=gen) * args.crop
    descriptors = landmark_descriptor(landmarks).to(device)
    positive, group = (t.to(device) for t in batch_layout(args.batch_clips, "sslfer"))
    loss_fn = DistributedInfoNCE(cfg.loss)

    torch.manual_seed(0)
    ddp_model = ContrastiveEncoder(cfg.model).to(device, dtype)
    ddp = DDP(ddp_model, device_ids=[device.index] if cuda else None)
    opt = torch.optim.Adam(
        ddp.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay
    )

    def ddp_step():
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            z = ddp(images)
        out = loss_fn(z.float(), positive, group, descriptors)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    ds_config = engine_config(args, cfg, world)
    torch.manual_seed(0)
    engine, *_ = deepspeed.initialize(
        model=ContrastiveEncoder(cfg.model),
        config=ds_config,
        model_parameters=None,
        dist_init_required=False,
    )

    def ds_step():
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            z = engine(images)
        out = loss_fn(z.float(), positive, group, descriptors)
        engine.backward(out.loss)
        engine.step()

    def sync():
        if cuda:
            torch.cuda.synchronize(device)
        distributed.barrier()

    results = {"ddp": [0.0, 0, 0, 0], "deepspeed": [0.0, 0, 0, 0]}  # seconds, steps, peak bytes, state bytes
    for step in (ddp_step, ds_step):
        for _ in range(2):  # warm-up (allocator, first-step optimizer state)
            step()
    for _ in range(max(1, args.steps // args.block)):
        for name, step in (("ddp", ddp_step), ("deepspeed", ds_step)):
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                for _ in range(args.block):
                    step()
                sync()
                seconds = time.perf_counter() - t0
            peak = torch.cuda.max_memory_allocated(device) if cuda else mem.peak - mem.base
            results[name][0] += seconds
            results[name][1] += args.block
            results[name][2] = max(results[name][2], peak)
    results["ddp"][3] = state_bytes(ddp_model, opt)
    results["deepspeed"][3] = state_bytes(engine.module, engine.optimizer)

    rows = distributed.all_gather_no_grad(
        torch.tensor([results[k] for k in ("ddp", "deepspeed")], dtype=torch.float64)
        .reshape(1, -1)
        .to(device)
    ).cpu()
    if rank == 0:
        imgs = {}
        print(f"ranks={world} device={args.device} arch={args.arch} width={args.width} crop={args.crop} "
              f"batch={n} images/rank precision={args.precision} zero_stage={args.zero_stage}")  # fmt: skip
        print(f"  engine: zero_stage={engine.zero_optimization_stage()} overlap_comm={engine.zero_overlap_comm()} "
              f"reduce_bucket_size={engine.zero_reduce_bucket_size()} "
              f"allgather_bucket_size={engine.zero_allgather_bucket_size()}")  # fmt: skip
        for i, name in enumerate(("ddp", "deepspeed")):
            seconds = rows[:, 4 * i].max().item()  # the slowest rank sets the pace
            steps = rows[0, 4 * i + 1].item()
            imgs[name] = steps * n * world / seconds
            mib = [
                ", ".join(f"{rows[r, 4 * i + c].item() / 2**20:.1f}" for r in range(world)) for c in (2, 3)
            ]
            print(f"  {name:10s} {imgs[name]:8.1f} images/s  {1000 * seconds / steps:7.1f} ms/step  "
                  f"peak step memory/rank (MiB): {mib[0]}  weights+grads+optimizer state/rank (MiB): {mib[1]}")  # fmt: skip
        print(f"overhead ratio (DDP images/s / DeepSpeed images/s): {imgs['ddp'] / imgs['deepspeed']:.3f}")
    distributed.barrier()
    distributed.destroy_distributed()


def worker_argv(argv: list[str]) -> list[str]:
    """The arguments for the ranks, without ``--nproc N``: torchrun reads its own options out of the script's
    arguments too, and ``--nproc`` is an ambiguous prefix of its ``--nproc-per-node`` (the ranks do not need it)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    args = parse_args()
    if args.worker:
        worker(args)
        return 0
    from common.errors import ConfigError

    try:  # a bad config or DeepSpeed JSON: one line here, not a traceback from every rank
        engine_config(args, bench_config(args), args.nproc)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("DS_ACCELERATOR", "cpu" if args.device == "cpu" else "cuda")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache/torch_extensions"))
    # the checkout first, then what the caller had (a GPU host's carried wheels)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
           "--master_port", str(_free_port()), __file__, "--worker", *worker_argv(sys.argv[1:])]  # fmt: skip
    return subprocess.call(cmd, env=env, cwd=REPO)


if __name__ == "__main__":
    sys.exit(main())

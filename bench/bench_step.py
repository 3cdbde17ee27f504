"""Training step at the compute limit: the full trainer vs a compute-only ceiling vs the original-code pipeline.

One run, same cores, same model / global batch / loss (all-gathered InfoNCE + MaskFN) / optimizer, per size
(``--device cuda``: the same three on a GPU host, (a) and (b) on ``--nproc`` GPUs over NCCL, (c) training on one
GPU with its DataLoader workers on the host's other cores):
  (a) ceiling:  2 CPU ranks, the project's DeepSpeed engine on images already in memory (communication
                included, no input pipeline; the trainer's glibc heap setting, data.keep_freed_memory);
  (b) trainer:  `deepspeed --num_gpus 2 launch/pretrain.py` on a SynthFace corpus (images/s: median of the
                run's metrics.jsonl windows, the start-up window left out, as bench/data_wait.py does);
  (c) original: the released code's style - one process, plain torch (no DeepSpeed), a DataLoader whose
                worker decodes with PIL, runs dlib landmark detection per image (the ingest detector,
                data_shards.faces.FaceAligner: HOG + 68-point predictor) and per-sample NumPy FaceSwap
                (pretrain.faceswap.face_swap_reference), torchvision view transforms; 1 loader worker + the
                training process = the same 2 cores.
Goals: (b) >= 0.9 (a) and (b) >= 5x (c). Timed: ``--steps`` for (a) and (b) after their warm-up / start-up
window, half as many for (c) (its per-sample pipeline is the slow part) after 2 + 2 x workers start-up steps
(the workers' first batches and the prefetch queue they fill).

    python bench/bench_step.py                      # demo model (ResNet-18 w16, 64 px) and ResNet-50 at 112 px
    python bench/bench_step.py --quick              # demo model only, few steps (smoke)
    python bench/bench_step.py --steps 100 --repeats 3   # medians of 3 alternating repeats, per-repeat ratios
    python bench/bench_step.py --variants fp32,bf16_autocast,compile --set data.num_workers=2
    python bench/bench_step.py --sizes r18w16-64 --variants threads1,threads2   # input threads vs inline
    python bench/bench_step.py --device cuda --sizes r50-112 --global-clips 128 --set precision=bf16_weights
                                                    # one GPU: (a) and (b) on it, (c)'s loader on the other cores

``--set KEY=VALUE`` goes to every run's config (a, b, c); ``--variants`` repeats (b) with each variant's
settings (fp32: precision=fp32; bf16_autocast: precision=bf16_autocast; compile: model.compile=true; inline,
threads1, threads2: data.num_workers=0, 1, 2, their priority as data.input_priority=auto picks it: idle where
no core is spare; threads1_normal: one thread at normal priority). A
variant whose config key this checkout does not have is reported as unavailable with the config's message.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

CONFIG = REPO / "launch/configs/sslfer.yaml"
# Sizes: config overrides on top of the paper config (launch/configs/sslfer.yaml).
SIZES = {
    "r18w16-64": ["model.arch=resnet18", "model.width=16", "model.projector_dims=[128,64]",
                  "data.image_size=72", "augment.resize=72", "augment.crop=64"],
    "r50-112": ["model.arch=resnet50", "model.width=64", "data.image_size=128", "augment.resize=128",
                "augment.crop=112"],
}  # fmt: skip
VARIANTS = {
    "fp32": ["precision=fp32"],
    "bf16_autocast": ["precision=bf16_autocast"],
    "compile": ["model.compile=true"],
    "inline": ["data.num_workers=0"],
    "threads1": ["data.num_workers=1"],
    "threads1_normal": ["data.num_workers=1", "data.input_priority=normal"],
    "threads2": ["data.num_workers=2"],
}
GOAL_CEILING, GOAL_ORIGINAL = 0.9, 5.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--sizes", default=None, help=f"comma list of {sorted(SIZES)} (default: all; --quick: first)"
    )
    p.add_argument(
        "--global-clips", type=int, default=8, help="clips per step over all ranks (4 images each)"
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps per part (default 12, --quick 6)")
    p.add_argument(
        "--identities", type=int, default=None, help="SynthFace identities (default 16, --quick 4)"
    )
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--variants", default="", help=f"comma list of {sorted(VARIANTS)}: (b) again with each")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run a, b, c (and variants) this many times in turn; the table gives medians",
    )
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu",
        help="cuda: (a) and (b) on --nproc GPUs (NCCL), (c) trains on one GPU; the input stays on the host's cores",
    )  # fmt: skip
    p.add_argument(
        "--nproc", type=int, default=None, help="ranks for (a) and (b) (default: 2 on cpu, 1 on cuda)"
    )
    p.add_argument(
        "--original-workers", type=int, default=None,
        help="DataLoader workers of (c) (default: the cores (a) and (b) use, less (c)'s own process: 1 for 2 CPU "
        "ranks; on cuda every core this process may run on, less one)",
    )  # fmt: skip
    p.add_argument("--quick", action="store_true")
    p.add_argument("--ceiling-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--overrides", default="[]", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.steps = args.steps or (6 if args.quick else 12)
    args.nproc = args.nproc or (2 if args.device == "cpu" else 1)
    if args.original_workers is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
        args.original_workers = max(1, args.nproc - 1 if args.device == "cpu" else cores - 1)
    if args.nproc < 1 or args.original_workers < 0:
        p.error("--nproc must be >= 1 and --original-workers >= 0")
    if args.repeats < 1:
        p.error("--repeats: at least 1")
    args.identities = args.identities or (4 if args.quick else 16)
    names = args.sizes.split(",") if args.sizes else (list(SIZES)[:1] if args.quick else list(SIZES))
    unknown = [n for n in names if n not in SIZES]
    if unknown:
        p.error(f"--sizes: unknown {unknown}; choose from {sorted(SIZES)}")
    args.sizes = names
    bad = [v for v in filter(None, args.variants.split(",")) if v not in VARIANTS]
    if bad:
        p.error(f"--variants: unknown {bad}; choose from {sorted(VARIANTS)}")
    return args


def load_cfg(overrides: list[str]):
    from common.configio import load_config
    from pretrain.config import PretrainConfig

    return load_config(PretrainConfig, CONFIG, overrides)


def run_overrides(size: str, global_clips: int, sets: list[str], device: str = "cpu") -> list[str]:
    """Every part's config: the size, the global batch, the device, fp32 (``--set precision=...`` to change it),
    input threads as the trainer's defaults pick them (data.num_workers=auto, data.input_priority=auto: one
    idle-priority thread per rank on 2 CPU ranks on 2 cores; the spare cores on a GPU host), FaceSwap in every
    measured step, --set."""
    return [*SIZES[size], f"data.global_batch_clips={global_clips}", f"device={device}", "precision=fp32",
            "data.num_workers=auto", "faceswap.start_step=0", "faceswap.p_warmup_steps=0", *sets]  # fmt: skip


def ratios(images_per_s: dict[str, float | None]) -> dict[str, float | None]:
    """(b)/(a) and (b)/(c) from images/s by part ('ceiling', 'trainer', 'original'); None where missing."""

    def div(a, b):
        return a / b if a and b else None

    t = images_per_s.get("trainer")
    return {
        "trainer/ceiling": div(t, images_per_s.get("ceiling")),
        "trainer/original": div(t, images_per_s.get("original")),
    }


def repeat_spread(size: str, runs: dict[str, list[float]]) -> str:
    """One line per size: each part's images/s range over the repeats and the per-repeat (b)/(a) ratios (a
    and b of one repeat ran back to back, so their ratio is less exposed to drift than either figure)."""
    spans = ", ".join(f"{part} {min(v):,.1f}-{max(v):,.1f}" for part, v in runs.items())
    paired = ", ".join(f"{t / c:.2f}" for t, c in zip(runs.get("trainer", []), runs.get("ceiling", [])))
    return f"{size}: images/s over repeats: {spans}; (b)/(a) by repeat: {paired}"


def format_table(rows: list[dict]) -> str:
    """Markdown table: one row per size (and trainer variant) with images/s of each part and the two ratios."""
    out = ["| size | variant | (a) ceiling img/s | (b) trainer img/s | (c) original img/s | (b)/(a) goal >= 0.9 "
           "| (b)/(c) goal >= 5 |", "|---|---|---|---|---|---|---|"]  # fmt: skip

    def num(x):
        return "-" if x is None else f"{x:,.1f}"

    def verdict(x, goal):
        return "-" if x is None else f"{x:.2f} ({'met' if x >= goal else 'NOT met'})"

    for r in rows:
        q = ratios(r)
        trainer = r.get("trainer") if r.get("error") is None else None
        out.append(
            f"| {r['size']} | {r.get('variant', 'fp32')} | {num(r.get('ceiling'))} | "
            f"{num(trainer) if r.get('error') is None else 'unavailable: ' + r['error']} | {num(r.get('original'))} "
            f"| {verdict(q['trainer/ceiling'], GOAL_CEILING)} | {verdict(q['trainer/original'], GOAL_ORIGINAL)} |"
        )
    return "\n".join(out)


# ---------------------------------------------------------------- (a) compute-only ceiling, on 2 ranks
def ceiling_worker(args) -> None:
    import deepspeed
    import torch

    from pretrain import distributed
    from pretrain.config import resolve_global_batch
    from pretrain.descriptors import landmark_descriptor
    from pretrain.ds_config import build_ds_config
    from pretrain.loss import DistributedInfoNCE, batch_layout
    from pretrain.model import ContrastiveEncoder

    cfg = load_cfg(json.loads(args.overrides))
    cuda = cfg.device == "cuda"
    distributed.init_distributed("nccl" if cuda else "gloo")
    # one rank: DeepSpeed (and DDP) still need a process group, as in the trainer
    if not distributed.is_initialized():
        distributed.single_process_env()
        deepspeed.init_distributed("nccl" if cuda else "gloo", auto_mpi_discovery=False)
    rank, world = distributed.get_rank(), distributed.get_world_size()
    cfg = resolve_global_batch(cfg, world)
    device = torch.device("cuda", distributed.get_local_rank()) if cuda else torch.device("cpu")
    if cfg.data.keep_freed_memory and not cuda:  # as the trainer's CPU pipeline sets it: the same heap
        from pretrain.allocator import keep_freed_memory

        keep_freed_memory()
    clips, crop = cfg.data.batch_clips, cfg.augment.crop
    gen = torch.Generator().manual_seed(rank)
    n = 4 * clips
    # as pretrain/engine.py: views on the device (bf16 under bf16_weights, channels_last if set), weights
    # contiguous, autocast under bf16_autocast, the loss in fp32
    images = torch.randn(n, 3, crop, crop, generator=gen).to(device)
    if cfg.precision == "bf16_weights":
        images = images.to(torch.bfloat16)
    if cfg.model.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    descriptors = landmark_descriptor(torch.rand(n, 68, 2, generator=gen) * crop).to(device)
    positive, group = (t.to(device) for t in batch_layout(clips, "sslfer"))
    loss_fn = DistributedInfoNCE(cfg.loss)
    autocast = cfg.precision == "bf16_autocast"
    torch.manual_seed(0)
    model = ContrastiveEncoder(cfg.model).to(device)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=build_ds_config(cfg, world),
        dist_init_required=False,
    )

    def step():
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            z = engine(images)
        out = loss_fn(z.float(), positive, group, descriptors)
        engine.backward(out.loss)
        engine.step()

    def sync():
        if cuda:
            torch.cuda.synchronize(device)
        distributed.barrier()

    for _ in range(2):  # warm-up: allocator, optimizer state
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
    slowest = distributed.all_gather_no_grad(seconds).max().item()
    if rank == 0:
        print("RESULT " + json.dumps({"images_per_s": args.steps * n * world / slowest}), flush=True)
    distributed.destroy_distributed()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_env(device: str = "cpu") -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR=device, PYTHONUNBUFFERED="1")
    # the checkout first, then what the caller had (bench/gpu_session.sh puts its carried wheels' site there)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache/torch_extensions"))
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def run_ceiling(overrides: list[str], steps: int, nproc: int = 2, device: str = "cpu") -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(_free_port()), __file__, "--ceiling-worker", "--steps", str(steps), "--overrides",
           json.dumps(overrides)]  # fmt: skip
    proc = subprocess.run(cmd, env=bench_env(device), cwd=REPO, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])["images_per_s"]
    raise RuntimeError(
        f"ceiling run failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    )


# ---------------------------------------------------------------- (b) the full trainer
def run_trainer(
    data: Path, overrides: list[str], steps: int, work: Path, nproc: int = 2, device: str = "cpu"
) -> float:
    import data_wait

    run_dir = work / f"run_{time.monotonic_ns()}"
    log_every = max(1, steps // 4)
    # DeepSpeed's launcher as a module of this interpreter: no `deepspeed` script on PATH needed (a GPU host
    # may have DeepSpeed only as carried wheels in a site on PYTHONPATH)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port",
           str(_free_port()), "launch/pretrain.py", "--config", str(CONFIG), f"data.url={data}",
           f"run_dir={run_dir}", f"max_steps={steps + log_every}", f"log_every={log_every}", "checkpoint_every=0",
           "metrics.port_base=0", *overrides]  # fmt: skip
    proc = subprocess.run(cmd, env=bench_env(device), cwd=REPO, capture_output=True, text=True)
    metrics = run_dir / "metrics.jsonl"
    if proc.returncode != 0 or not metrics.is_file():
        raise RuntimeError(
            f"trainer run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}"
        )
    lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    return data_wait.summarise(lines, skip=1)["images_per_s"]


# ---------------------------------------------------------------- (c) the original-code-style pipeline
class OriginalStyleClips:
    """torch Dataset over clips held as JPEG bytes: one item = the 4 views [A, NA, P, NP] of one clip.

    A and P are two frames of the clip (TimeAug), NA and NP two frames of another clip of the same identity
    (the hard negatives; the clip itself when the identity has one clip). Each frame: PIL decode, dlib HOG
    detection and the 68-point predictor (in the stored landmarks' box when HOG finds no face: counted in
    ``no_face``, the predictor's cost is paid either way), P and NP get a face swapped in
    from a frame of another identity with probability ``faceswap.p`` (NumPy, per sample), then torchvision views.
    """

    def __init__(self, clips: list[dict], cfg, seed: int = 0):
        self.clips, self.cfg, self.seed = clips, cfg, seed
        by_id: dict[str, list[int]] = {}
        for i, c in enumerate(clips):
            by_id.setdefault(c["meta"]["identity_id"], []).append(i)
        self.by_id = by_id
        self.aligner = None
        self.no_face = 0

    def __len__(self) -> int:
        return len(self.clips)

    def _frame(self, clip: int, frame: int):
        import io

        import numpy as np
        from PIL import Image

        from data_shards.faces import FaceAligner, FaceConfig, to_rgb_array

        if self.aligner is None:  # per worker process: dlib objects do not pickle
            self.aligner = FaceAligner(FaceConfig(upsample=1))
        img = Image.open(io.BytesIO(self.clips[clip]["frames"][frame])).convert("RGB")
        size = self.cfg.data.image_size
        stored = np.asarray(self.clips[clip]["meta"]["landmarks"][frame], np.float64) * (size / img.width)
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        rgb = to_rgb_array(img)
        boxes = self.aligner.detect(rgb)
        if not boxes:  # HOG misses most small SynthFace frames: fit the predictor in the stored face's box
            self.no_face += 1
            lo, hi = stored.min(0), stored.max(0)
            boxes = [(int(lo[0]), int(lo[1]), int(hi[0]) + 1, int(hi[1]) + 1)]
        return rgb.astype(np.float64), self.aligner.landmarks(rgb, boxes[0])

    def __getitem__(self, i: int):
        import numpy as np
        import torch

        from pretrain.descriptors import landmark_descriptor
        from pretrain.faceswap import face_swap_reference

        rng = np.random.default_rng((self.seed, i, time.monotonic_ns()))
        identity = self.clips[i]["meta"]["identity_id"]
        others = [j for j in self.by_id[identity] if j != i] or [i]
        neg = int(rng.choice(others))
        donors = [j for j in range(len(self.clips)) if self.clips[j]["meta"]["identity_id"] != identity] or [
            i
        ]
        views, marks = [], []
        for role, clip in (("A", i), ("NA", neg), ("P", i), ("NP", neg)):
            rgb, lm = self._frame(clip, int(rng.integers(len(self.clips[clip]["frames"]))))
            if role in ("P", "NP") and rng.random() < self.cfg.faceswap.p:
                d = int(rng.choice(donors))
                drgb, dlm = self._frame(d, int(rng.integers(len(self.clips[d]["frames"]))))
                rgb, lm, _ = face_swap_reference(rgb, lm, drgb, dlm, self.cfg.faceswap)
            views.append(self._view(rgb))
            marks.append(torch.as_tensor(lm, dtype=torch.float32))
        return torch.stack(views), landmark_descriptor(torch.stack(marks))

    def _view(self, rgb):
        import torch
        from torchvision.transforms import v2

        a = self.cfg.augment
        if not hasattr(self, "_tf"):
            self._tf = v2.Compose([
                v2.RandomResizedCrop(a.crop, scale=(0.6, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(0.2),
                v2.RandomApply([v2.GaussianBlur(9)], p=0.5), v2.ToDtype(torch.float32, scale=True),
            ])  # fmt: skip
        x = torch.from_numpy(rgb.clip(0, 255).astype("uint8")).permute(2, 0, 1)
        return self._tf(x)


def to_batch_rows(views, descriptors):
    """Collated (B, 4, C, H, W) views and (B, 4, D) descriptors -> rows [A..., NA..., P..., NP...]."""
    b = views.shape[0]
    rows = views.transpose(0, 1).reshape(4 * b, *views.shape[2:])
    return rows, descriptors.transpose(0, 1).reshape(4 * b, -1)


def run_original(clips: list[dict], overrides: list[str], steps: int, workers: int = 1) -> float:
    """(c): one process, plain torch; the model on ``device`` (a GPU trains there, as the released code did),
    the input in ``workers`` DataLoader processes. bf16 as plain torch does it: autocast for bf16_autocast, a
    bf16 model and batch for bf16_weights."""
    import torch

    from pretrain.loss import DistributedInfoNCE, batch_layout
    from pretrain.model import ContrastiveEncoder

    torch.set_num_threads(1)
    cfg = load_cfg(overrides)
    device = torch.device(cfg.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cfg.precision == "bf16_weights" else torch.float32
    autocast = cfg.precision == "bf16_autocast"
    b = cfg.data.global_batch_clips
    loader = torch.utils.data.DataLoader(
        OriginalStyleClips(clips, cfg), batch_size=b, shuffle=True, num_workers=workers, drop_last=True,
        persistent_workers=workers > 0, prefetch_factor=2 if workers else None, pin_memory=cuda,
    )  # fmt: skip
    torch.manual_seed(0)
    model = ContrastiveEncoder(cfg.model).to(device, dtype)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                           weight_decay=cfg.optim.weight_decay)  # fmt: skip
    loss_fn = DistributedInfoNCE(cfg.loss)
    positive, group = (t.to(device) for t in batch_layout(b, "sslfer"))

    def now() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter()

    # Untimed: the workers' first batches, which arrive together after their start-up, and what the prefetch
    # queue held then; the timed steps then come at the rate the workers produce them.
    warmup = 2 + workers * 2
    done, t0 = 0, None
    while done < steps + warmup:
        for views, desc in loader:
            rows, desc = to_batch_rows(views, desc)
            rows, desc = rows.to(device, dtype, non_blocking=True), desc.to(device, non_blocking=True)
            with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
                z = model(rows)
            out = loss_fn(z.float(), positive, group, desc)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            done += 1
            if done == warmup:
                t0 = now()
            if done == steps + warmup:
                break
    return steps * 4 * b / (now() - t0)


def load_clips(url: str) -> list[dict]:
    from data_shards.read import iter_dataset

    return list(iter_dataset(url))


def main() -> int:
    args = parse_args()
    if args.ceiling_worker:
        ceiling_worker(args)
        return 0
    from common.errors import ConfigError

    variants = [v for v in args.variants.split(",") if v]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        work = Path(tmp)
        data = work / "clips"
        subprocess.run([sys.executable, "-m", "data_shards", "synth", "--out", str(data), "--identities",
                        str(args.identities), "--clips-per-identity", "2", "--seconds", "4", "--size", "128",
                        "--seed", "0", "--shard-samples", "2", "--no-progress"], env=bench_env(), cwd=REPO, check=True,
                       capture_output=True)  # fmt: skip
        clips = load_clips(str(data))
        for size in args.sizes:
            base = run_overrides(size, args.global_clips, args.sets, args.device)
            load_cfg(base)  # a bad --set fails here, with the config's message
            print(f"== {size}: {' '.join(base)}", flush=True)
            runs: dict[str, list[float]] = {}  # part or variant -> images/s of each repeat
            errors: dict[str, str] = {}
            for repeat in range(args.repeats):  # a, b, c (and variants) in turn: machine drift hits all alike
                tag = f" [repeat {repeat + 1}/{args.repeats}]" if args.repeats > 1 else ""
                parts = [("a", "ceiling", run_ceiling, (base, args.steps, args.nproc, args.device)),
                         ("b", "trainer", run_trainer, (data, base, args.steps, work, args.nproc, args.device)),
                         ("c", "original", run_original,
                          (clips, base, max(2, args.steps // 2), args.original_workers))]  # fmt: skip
                for label, part, fn, fn_args in parts:
                    runs.setdefault(part, []).append(fn(*fn_args))
                    print(f"  ({label}) {part:8s} {runs[part][-1]:8.1f} images/s{tag}", flush=True)
                for v in variants:
                    if v in errors:
                        continue
                    try:
                        load_cfg(base + VARIANTS[v])
                        runs.setdefault(v, []).append(
                            run_trainer(data, base + VARIANTS[v], args.steps, work, args.nproc, args.device)
                        )
                        print(f"  (b) {v}: {runs[v][-1]:8.1f} images/s{tag}", flush=True)
                    except ConfigError as err:
                        errors[v] = str(err).splitlines()[0][:120]
                        print(f"  (b) {v}: {errors[v]}", flush=True)
            row = {"size": size, "variant": "as set", "repeats": runs}
            row.update({part: statistics.median(runs[part]) for part in ("ceiling", "trainer", "original")})
            rows.append(row)
            for v in variants:
                vrow = {"size": size, "variant": v, "ceiling": row["ceiling"], "original": row["original"]}
                if v in errors:
                    vrow["error"] = errors[v]
                else:
                    vrow["trainer"] = statistics.median(runs[v])
                rows.append(vrow)
    ranks = f"{args.nproc} {'CPU' if args.device == 'cpu' else 'GPU'} rank{'s' if args.nproc > 1 else ''}"
    print(f"\n{ranks}, (c) with {args.original_workers} loader worker{'s' if args.original_workers != 1 else ''}; {args.global_clips} clips = "
          f"{4 * args.global_clips} images per step, "
          f"{args.steps} timed steps (ceiling, trainer), config {CONFIG.relative_to(REPO)} + overrides above"
          + (f"; medians of {args.repeats} repeats" if args.repeats > 1 else ""))  # fmt: skip
    print(format_table(rows))
    for row in rows:
        if args.repeats > 1 and "repeats" in row:
            print(repeat_spread(row["size"], row["repeats"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

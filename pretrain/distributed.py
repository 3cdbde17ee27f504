"""Rank/world helpers and collectives: the only module of ``pretrain`` that asks which process it is.

Every collective of the project lives here, so the rest reads as plain code: agreement on a flag
(:func:`any_rank`, :func:`all_ranks`), gathers, reductions and broadcasts. Everything works without an
initialised process group (a plain single-process run): the rank is 0, the world size 1 and every collective is
the identity. :func:`init_distributed` reads the environment written by
``torchrun`` or the ``deepspeed`` launcher (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``; Open MPI's ``OMPI_COMM_WORLD_*`` as a fallback).

All-gather with gradient (:func:`all_gather_with_grad`) is exact: its backward sums the incoming gradients of
every rank (all-reduce SUM) and keeps this rank's slice. Combined with a data-parallel engine that AVERAGES
parameter gradients over ranks, a loss that is the mean over this rank's rows yields the gradient of the mean
over all rows of the global batch (see ``pretrain.loss.DistributedInfoNCE``).
"""

from __future__ import annotations

import atexit
import datetime
import glob
import os
import socket
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

Backend = Literal["auto", "gloo", "nccl"]

# Launcher variables, first match wins: torchrun/deepspeed, then Open MPI (mpirun).
_RANK_VARS = ("RANK", "OMPI_COMM_WORLD_RANK")
_WORLD_VARS = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE")
_LOCAL_RANK_VARS = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str  # "none" when no process group was created (single process)


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return default


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def get_local_rank() -> int:
    """Index of this process on its node (device index under CUDA); 0 without a launcher."""
    return _env_int(_LOCAL_RANK_VARS, 0)


def is_main() -> bool:
    return get_rank() == 0


def init_distributed(backend: Backend = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Create the default process group from the launcher environment (idempotent).

    ``auto`` picks nccl when CUDA is available, else gloo. With no launcher (or WORLD_SIZE=1) no group is
    created and the run is single-process. Under CUDA the current device becomes ``LOCAL_RANK``.
    """
    if backend not in ("auto", "gloo", "nccl"):
        raise ValueError(f"backend must be auto, gloo or nccl, got {backend!r}")
    local_rank = get_local_rank()
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("backend 'nccl' needs CUDA, which is not available here: use 'gloo' or 'auto'")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if is_initialized():
        return DistInfo(get_rank(), get_world_size(), local_rank, str(dist.get_backend()))
    world_size = _env_int(_WORLD_VARS, 1)
    if world_size <= 1:
        return DistInfo(0, 1, local_rank, "none")
    rank = _env_int(_RANK_VARS, 0)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} but MASTER_PORT is not set: start the run with torchrun or deepspeed"
        )
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    atexit.register(remove_shm_buffers, os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], rank)
    if backend == "gloo":
        # Left to C++ static destruction at exit, gloo's threads occasionally abort the process after a finished
        # run ("terminate called without an active exception", exit 250): tear the group down first.
        atexit.register(_destroy_at_exit)
    return DistInfo(rank, world_size, local_rank, backend)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def single_process_env() -> None:
    """Launcher variables of a one-rank world, for a plain ``python`` start that still needs a process group
    (DeepSpeed insists on one): rank 0 of 1 on a free loopback port, unless the environment names one."""
    os.environ.update(RANK="0", LOCAL_RANK=os.environ.get("LOCAL_RANK", "0"), WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())


def _destroy_at_exit() -> None:
    try:
        destroy_distributed()
    except Exception:  # noqa: BLE001 - exiting anyway; never turn a finished run into a failed exit
        pass


def remove_shm_buffers(addr: str, port: str, rank: int, root: str = "/dev/shm") -> list[str]:
    """Delete this rank's DeepSpeed CPU all-reduce buffers (``deepspeed_allreduce_buffer_*_ADDR_PORT_RANK``).

    DeepSpeed's shared-memory all-reduce on CPU leaves 64 MiB per rank in /dev/shm after every run; on a
    machine that runs many jobs (this project's test suite, an ablation) they add up to gigabytes of RAM, until
    Ray's memory monitor starts killing workers. Registered at exit by :func:`init_distributed`."""
    removed = []
    for path in glob.glob(os.path.join(root, f"deepspeed_allreduce_buffer_*_{addr}_{port}_{rank}")):
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:  # already gone, or not ours to delete
            pass
    return removed


def destroy_distributed() -> None:
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's tensor along dim 0; backward = all-reduce SUM, then this rank's slice."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        ctx.rank, ctx.rows = rank, tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        # Every rank's loss may depend on our rows: their gradients w.r.t. our slice must be added up.
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """(n, ...) on each rank -> (world*n, ...), rank-major; gradients flow back to every rank's input.

    Every rank must pass the same shape. Row ``rank * n + i`` of the result is row ``i`` of ``rank``.
    """
    if get_world_size() == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Like :func:`all_gather_with_grad` but detached (indices, descriptors, metrics)."""
    if get_world_size() == 1:
        return tensor.detach()
    tensor = tensor.detach().contiguous()
    parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts, dim=0)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a (detached) tensor; returns a new tensor."""
    out = tensor.detach().clone()
    if get_world_size() == 1:
        return out
    if not out.is_floating_point():
        out = out.double()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / get_world_size()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from ``src`` to every rank; returns it on all ranks."""
    if get_world_size() == 1:
        return obj
    holder = [obj if get_rank() == src else None]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def _flag_device() -> torch.device:
    # nccl reduces device tensors only (on the rank's current device); gloo takes CPU ones.
    if str(dist.get_backend()) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one rank (collective: every rank must call it).

    Ranks that must take the same branch (stop, skip a step, abandon a checkpoint) agree through it; a branch
    taken by some ranks only would leave the others waiting in the next collective until the timeout.
    """
    if get_world_size() == 1:
        return bool(flag)
    value = torch.tensor([1.0 if flag else 0.0], device=_flag_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def all_ranks(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on every rank (collective: every rank must call it)."""
    return not any_rank(not flag)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order, on every rank (collective)."""
    if get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered

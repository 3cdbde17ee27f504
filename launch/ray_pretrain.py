"""Pretraining on a Ray cluster: Ray Train's ``TorchTrainer`` runs the same :class:`pretrain.engine.Trainer`.

    python -m launch.ray_pretrain --config launch/configs/sslfer.yaml --num-workers 8 --use-gpu \\
        run_dir=/shared/runs/sslfer data.url=s3://sslfer/clips/pretrain data.batch_clips=32
    # as a job on a cluster (the driver then runs on the head, the workers wherever Ray places them):
    python -m launch.ray_submit --address http://HEAD:8265 --working-dir . -- \\
        python -m launch.ray_pretrain --config launch/configs/sslfer.yaml --num-workers 8 --use-gpu run_dir=...

Why TorchTrainer and not a DeepSpeed hostfile: the ``deepspeed`` multi-node launcher starts ranks over
passwordless ssh (pdsh) from a hostfile, which Ray clusters (cloud autoscaler, KubeRay pods) usually do not
have, and Ray would neither know nor schedule those processes. ``TorchTrainer`` asks Ray for ``num_workers``
actors with the requested CPUs/GPUs (placement group, PACK by default; ``--placement-strategy STRICT_SPREAD``
puts each worker on its own node), starts the process group (gloo on CPU,
NCCL on GPU) and sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` in every worker.
``pretrain.distributed.init_distributed`` reuses an initialised group, and ``deepspeed.initialize(...,
dist_init_required=False)`` wraps it, so the DeepSpeed engine, ZeRO, checkpoints and metrics are exactly those
of ``deepspeed launch/pretrain.py``. Ray restarts the whole group after a worker or node failure
(``--max-failures``) and the run resumes from its latest checkpoint (``resume=auto``).

Requirements on a multi-node cluster: ``run_dir`` (checkpoints: every rank writes its shard) on a filesystem
all nodes share, or ``checkpoint.mirror_url=s3://...``; ``data.url`` readable from every node (S3 or shared).
Relative paths are made absolute against the driver's working directory. Exit codes: 0 trained, 1 the run
failed, 2 bad config or arguments.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from common.errors import ConfigError
from common.ray_jobs import STORE_ENV

# Variables the ranks need that a Ray worker does not necessarily inherit from the driver.
FORWARD_ENV = (
    "OMP_NUM_THREADS",
    "DS_ACCELERATOR",
    "TORCH_EXTENSIONS_DIR",
    *STORE_ENV,
    "SSLFER_METRICS_PUBLIC",
    "NCCL_SOCKET_IFNAME",
    "NCCL_DEBUG",
)


def _absolute(path: str | None) -> str | None:
    if not path or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def prepare_config(config: str | None, overrides: list[str], use_gpu: bool):
    """Load and validate the config on the driver; local paths become absolute (workers share them)."""
    from common.configio import load_config
    from pretrain.config import PretrainConfig

    cfg = load_config(PretrainConfig, config, overrides)
    if use_gpu and cfg.device == "cpu":
        raise ConfigError("config key 'device': cpu contradicts --use-gpu (use device=auto or cuda)")
    if not use_gpu and cfg.device == "cuda":
        raise ConfigError("config key 'device': cuda needs --use-gpu (Ray hides GPUs from CPU workers)")
    cfg.run_dir = _absolute(cfg.run_dir)
    cfg.data.url = _absolute(cfg.data.url)
    cfg.metrics.file_sd_dir = _absolute(cfg.metrics.file_sd_dir)
    if cfg.checkpoint.mirror_url:
        cfg.checkpoint.mirror_url = _absolute(cfg.checkpoint.mirror_url)
    if cfg.resume not in ("auto", "never"):
        cfg.resume = _absolute(cfg.resume)
    if cfg.metrics.enabled and not cfg.metrics.run:
        cfg.metrics.run = Path(cfg.run_dir).name  # the same `run` label on every node
    return cfg


def train_worker(config: dict) -> None:
    """Body of each Ray Train worker: the process group exists already (TorchTrainer made it); its environment
    (store credentials, threads) came with the job's runtime environment."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pretrain.engine import run

    status = run(config["cfg"])
    if status not in ("finished", "stopped", "signal"):
        raise RuntimeError(f"training ended with status {status}")


def worker_env(use_gpu: bool, cpus_per_worker: float) -> dict[str, str]:
    """The environment the ranks need, credentials included: it travels in the job's runtime environment
    (``ray.init(runtime_env=...)``), never in the trainer's config, which Ray records and shows."""
    env = {k: os.environ[k] for k in FORWARD_ENV if k in os.environ}
    env.setdefault("OMP_NUM_THREADS", str(max(1, int(cpus_per_worker))))
    if not use_gpu:
        env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def _not_in_job_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` less what a submitted job's own runtime environment already sets (Ray refuses to merge two
    runtime environments that set one variable; the job's value is this process's anyway)."""
    import json

    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    taken = ((job.get("runtime_env") or {}).get("env_vars") or {}).keys()
    return {k: v for k, v in env.items() if k not in taken}


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def build_trainer(
    cfg,
    num_workers: int,
    use_gpu: bool,
    cpus_per_worker: float,
    max_failures: int,
    placement_strategy: str = "PACK",
):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=1800),
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            placement_strategy=placement_strategy,
        ),
        run_config=RunConfig(
            name=Path(cfg.run_dir).name,
            storage_path=str(Path(cfg.run_dir) / "ray"),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(
        prog="python -m launch.ray_pretrain",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file (launch/configs/*.yaml)")
    parser.add_argument("--num-workers", type=int, required=True, help="ranks (one per GPU with --use-gpu)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument(
        "--max-failures", type=int, default=0, help="group restarts after a worker/node failure (resumes)"
    )
    parser.add_argument(
        "--placement-strategy",
        default="PACK",
        choices=PLACEMENT_STRATEGIES,
        help="Ray placement of the workers; STRICT_SPREAD: every worker on its own node",
    )
    parser.add_argument(
        "--address", default=None, help="Ray cluster (default: RAY_ADDRESS / the job's cluster)"
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    if args.num_workers < 1 or args.cpus_per_worker <= 0 or args.max_failures < 0:
        print("error: --num-workers >= 1, --cpus-per-worker > 0, --max-failures >= 0", file=sys.stderr)
        return 2

    try:
        cfg = prepare_config(args.config, args.overrides, args.use_gpu)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from common.ray_jobs import RAY_ENV

    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    import ray

    ray.init(
        address=args.address,
        logging_level="WARNING",
        runtime_env={"env_vars": _not_in_job_env(worker_env(args.use_gpu, args.cpus_per_worker))},
    )
    try:
        resources = ray.cluster_resources()
        need = {
            "CPU": args.cpus_per_worker * args.num_workers,
            "GPU": args.num_workers if args.use_gpu else 0,
        }
        short = {k: (v, resources.get(k, 0)) for k, v in need.items() if v > resources.get(k, 0)}
        if short:
            # An infeasible placement group waits forever (autoscaling clusters may still add nodes: warn only).
            logging.warning(
                "the cluster has %s now; %d workers need %s: waiting for nodes to be added",
                {k: resources.get(k, 0) for k in need},
                args.num_workers,
                need,
            )
        trainer = build_trainer(
            cfg,
            args.num_workers,
            args.use_gpu,
            args.cpus_per_worker,
            args.max_failures,
            args.placement_strategy,
        )
        try:
            trainer.fit()
        except Exception as err:  # noqa: BLE001 - Ray wraps the workers' errors: one line for the user
            print(f"error: pretraining failed on the cluster: {err}", file=sys.stderr)
            return 1
    finally:
        ray.shutdown()
    print(f"pretraining finished; run dir {cfg.run_dir} (checkpoints/, backbone.pt, metrics.jsonl)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m eval``: evaluate frozen backbones on labelled frames datasets, fanned out on Ray.

    python -m eval --checkpoint runs/simclr/backbone.pt,runs/sslfer/backbone.pt \\
        --data .cache/synth-eval --tasks expression,va,identity --out runs/eval --seeds 3 [--address local]

``--address``: ``local`` starts an in-process Ray (2 CPUs by default); ``auto`` or ``ray://...`` joins a running
cluster; ``http://HOST:8265`` submits this same command as a Ray job to that cluster's Jobs API (through
``launch.ray_submit``) with ``--address auto``, follows its log and waits; ``--out`` must then be a path the
cluster writes to and this machine can read (same host or a shared filesystem).
Extra ``key=value`` arguments override any config key (``ray.task_timeout_s=60``, ``probes.knn_k=20``).
``--pushgateway http://HOST:9091`` pushes progress (cells done/total) and the metric means, labelled by
checkpoint, task and dataset, to a Prometheus Pushgateway (``eval/pushgateway.py``).
Writes DIR/results.json, DIR/results.md, DIR/*.png and DIR/config.yaml. Exit code: 0 all cells ok, 1 some
cells failed, 2 bad arguments, 3 timed out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.configio import load_config, save_config
from common.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="backbone.pt path(s), comma-separated")
    p.add_argument("--data", required=True, help="frames dataset URL(s) (folder or s3://), comma-separated")
    p.add_argument(
        "--tasks", default="expression,va,identity", help="comma-separated: expression,va,identity,finetune"
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3)")
    p.add_argument("--address", default=None, help="local | auto | ray://host:port | http://host:8265")
    p.add_argument("--config", default=None, help="YAML file with EvalConfig keys")
    p.add_argument("--max-samples", type=int, default=None, help="read at most N samples per dataset")
    p.add_argument("--task-timeout", type=float, default=None, help="seconds without any task finishing")
    p.add_argument(
        "--job-timeout", type=float, default=3600.0, help="with an http:// address: job wait limit"
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--pushgateway", default=None, help="Prometheus Pushgateway URL: push progress and metric means"
    )
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def resolve_config(args: argparse.Namespace):
    from eval.fanout import EvalConfig

    cfg = load_config(EvalConfig, args.config, args.overrides)
    cfg.checkpoints = _split(args.checkpoint)
    cfg.data = _split(args.data)
    cfg.tasks = _split(args.tasks)
    cfg.out = args.out
    if args.seeds is not None:
        cfg.seeds = args.seeds
    if args.address is not None:
        cfg.ray.address = args.address
    if args.max_samples is not None:
        cfg.max_samples = args.max_samples
    if args.task_timeout is not None:
        cfg.ray.task_timeout_s = args.task_timeout
    if args.pushgateway is not None:
        cfg.pushgateway = args.pushgateway
    cfg.validate()
    cfg.check_inputs()
    return cfg


def _as_job(argv: list[str], args: argparse.Namespace) -> int:
    """Resubmit this command to a Ray Jobs API with absolute local paths and ``--address auto``."""
    from common.ray_jobs import submit_and_wait

    def absolute(value: str) -> str:
        return ",".join(str(Path(v).resolve()) if Path(v).exists() else v for v in _split(value))

    entry = ["python", "-m", "eval", "--checkpoint", absolute(args.checkpoint), "--data", absolute(args.data)]
    entry += [
        "--tasks",
        args.tasks,
        "--out",
        str(Path(args.out).resolve()),
        "--address",
        "auto",
        "--no-progress",
    ]
    for flag, value in (
        ("--seeds", args.seeds),
        ("--config", args.config and str(Path(args.config).resolve())),
        ("--max-samples", args.max_samples),
        ("--task-timeout", args.task_timeout),
        ("--pushgateway", args.pushgateway),
    ):
        if value is not None:
            entry += [flag, str(value)]
    entry += args.overrides
    repo_root = Path(__file__).resolve().parents[1]  # the code the job runs: this checkout
    return submit_and_wait(args.address, entry, working_dir=str(repo_root), timeout_s=args.job_timeout)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.address and args.address.startswith(("http://", "https://")):
        return _as_job(argv, args)
    from eval.fanout import EvalTimeout, run_eval
    from eval.report import write_report

    try:
        cfg = resolve_config(args)
        captured: dict = {}
        doc = run_eval(
            cfg,
            progress=not args.no_progress,
            on_features=lambda feats, labels: captured.update(features=feats, labels=labels),
        )
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except EvalTimeout as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    out = Path(cfg.out)
    save_config(cfg, out / "config.yaml")
    written = write_report(doc, out, captured.get("features"), captured.get("labels"))
    print((out / "results.md").read_text())
    print(f"wrote {len(written)} files to {out} (results.json, results.md, plots, config.yaml)")
    failed = any(
        cell.get("errors") for t in doc["results"].values() for d in t.values() for cell in d.values()
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

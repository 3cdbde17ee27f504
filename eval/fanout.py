"""Fan out every (checkpoint, task, dataset, seed) evaluation as a Ray task and gather the results.

Task graph (Ray object refs carry the data, so nothing is computed twice):

    features(ckpt, dataset)  one per pair             -> float32 [N, D] + labels  (GPU when requested)
    probe(task, seed)        one per cell and seed    -> metrics           (CPU; takes the features ref)
    load(dataset)            one per dataset URL      -> FramesData (images + labels), for finetune only
    finetune(seed)           one per cell and seed    -> metrics           (GPU when requested; takes images)

With ``stream`` (the default) a features task reads its dataset from the store itself, one chunk of
``features.batch_size`` JPEGs at a time (``eval/stream.py``): memory grows with the N x D features, not with
the images, and no object holds a dataset's JPEGs. ``stream=false`` is the earlier graph: one ``load`` task
per dataset (every JPEG in one Ray object), shared by the features tasks of every checkpoint.

Resource requests: ``ray.gpus_per_task`` = -1 (auto) asks for one GPU per feature/fine-tune task when the
cluster has GPUs and none otherwise; every task asks for ``ray.cpus_per_task`` CPUs (fractional, so a
2-core machine runs several probes at once). Probes run on CPUs by default: a logistic regression on a few
thousand feature vectors takes about a second, a GPU would idle.

Failures: Ray retries a task whose worker died (``max_retries``) and tasks that raised ``OSError`` (storage
hiccups). A task that still fails becomes an ``errors`` entry in its cell; the others carry on. If no task
finishes for ``ray.task_timeout_s`` seconds (typically a request no node can satisfy, e.g. a GPU on a CPU
cluster: Ray would wait forever), the run stops with :class:`EvalTimeout` naming the stuck tasks and what they
asked for.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import ConfigError
from eval.data import (
    FramesData,
    FramesLabels,
    check_dataset,
    dataset_name,
    gallery_probe_split,
    load_frames,
    train_test_split,
)
from eval.features import FeatureConfig, extract_features
from eval.finetune import FinetuneConfig, finetune
from eval.probes import ProbeConfig, identity_leakage, knn_probe, linear_probe, va_regression
from eval.stream import stream_features

TASKS = ("expression", "va", "identity", "finetune")
NUM_EXPRESSIONS = 8  # AffectNet-8 (data_shards.labels.EXPRESSIONS)


class EvalTimeout(RuntimeError):
    """No task finished within the per-task timeout; the message names the stuck tasks and their requests."""


@dataclass
class RayConfig:
    address: str = "local"  # local (in-process cluster), auto, ray://host:port or http://host:8265 (a job)
    local_cpus: int = 2  # CPUs of the in-process cluster
    object_store_memory: int = 300_000_000  # bytes, in-process cluster only (Ray's default takes 30% of RAM)
    cpus_per_task: float = 0.5  # CPU request of each task
    gpus_per_task: float = -1.0  # -1: 1 when the cluster has GPUs, else 0
    probe_gpus: float = 0.0  # GPUs requested by probe tasks
    max_retries: int = 2  # retries of a failed task
    task_timeout_s: float = 900.0  # seconds without any task finishing before a timeout error

    def validate(self) -> None:
        if self.cpus_per_task <= 0:
            raise ConfigError(f"config key 'ray.cpus_per_task': must be > 0, got {self.cpus_per_task}")
        if self.gpus_per_task < 0 and self.gpus_per_task != -1:
            raise ConfigError(f"config key 'ray.gpus_per_task': -1 (auto) or >= 0, got {self.gpus_per_task}")
        if self.task_timeout_s <= 0:
            raise ConfigError(f"config key 'ray.task_timeout_s': must be > 0, got {self.task_timeout_s}")
        if self.max_retries < 0:
            raise ConfigError(f"config key 'ray.max_retries': must be >= 0, got {self.max_retries}")


@dataclass
class EvalConfig:
    checkpoints: list[str] = field(default_factory=list)  # backbone.pt paths (--checkpoint)
    data: list[str] = field(default_factory=list)  # frames dataset URLs (--data)
    tasks: list[str] = field(  # any of expression, va, identity, finetune (--tasks)
        default_factory=lambda: ["expression", "va", "identity"]
    )
    out: str = "runs/eval"  # output folder (--out)
    seeds: int = 3  # probe seeds per cell (--seeds)
    test_fraction: float = 0.3  # share of identities held out for the expression / V/A test sets
    max_samples: int | None = None  # per dataset, for smoke runs
    pushgateway: str = ""  # http://host:9091: push progress and metric means (eval/pushgateway.py)
    # True: probe features streamed from the store per (checkpoint, dataset), at most features.batch_size
    # JPEGs in memory; False: each dataset loaded whole into one Ray object first (read once per dataset)
    stream: bool = True  # probe features streamed in bounded memory (eval/stream.py)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    probes: ProbeConfig = field(default_factory=ProbeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def validate(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ConfigError(
                f"--tasks (config key 'tasks'): unknown task {unknown[0] if unknown else '(none)'!r}; "
                f"choose from {', '.join(TASKS)}"
            )
        if self.seeds < 1:
            raise ConfigError(f"--seeds (config key 'seeds'): must be >= 1, got {self.seeds}")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"config key 'test_fraction': must be in (0, 1), got {self.test_fraction}")
        for sub in (self.features, self.probes, self.finetune, self.ray):
            sub.validate()

    def check_inputs(self) -> None:
        """The run's inputs exist (separate from validate(): a YAML file may leave them to the CLI)."""
        if not self.checkpoints:
            raise ConfigError("--checkpoint (config key 'checkpoints'): give at least one backbone.pt path")
        if not self.data:
            raise ConfigError("--data (config key 'data'): give at least one frames dataset URL")
        for i, path in enumerate(self.checkpoints):
            if not Path(path).is_file():
                raise ConfigError(
                    f"--checkpoint (config key 'checkpoints[{i}]'): file '{path}' does not exist "
                    "(pretraining writes RUN_DIR/backbone.pt)"
                )


def checkpoint_names(paths: list[str]) -> list[str]:
    """Readable unique names: the run folder for ``.../RUN/backbone.pt``, else the file stem."""
    names = []
    for path in paths:
        p = Path(path)
        name = p.parent.name if p.stem == "backbone" and p.parent.name else p.stem
        base, n = name, 2
        while name in names:
            name, n = f"{base}-{n}", n + 1
        names.append(name)
    return names


# ---------------------------------------------------------------- task bodies (run inside Ray workers)


def load_task(url: str, max_samples: int | None) -> FramesData:
    return load_frames(url, max_samples=max_samples)


def features_task(checkpoint: str, data: FramesData, cfg: FeatureConfig) -> np.ndarray:
    return extract_features(checkpoint, data.jpegs, cfg)


def stream_task(checkpoint: str, url: str, cfg: FeatureConfig, max_samples: int | None):
    """(features, labels) of one (checkpoint, dataset), streamed: two Ray objects, neither with images."""
    out = stream_features(checkpoint, url, cfg, max_samples)
    return out.features, out.labels


def probe_task(task: str, features: np.ndarray, labels: FramesLabels, seed: int, cfg: EvalConfig) -> dict:
    """One probe on one seed: the seed sets the identity split, the validation carve and the init."""
    train, test = train_test_split(labels, seed, cfg.test_fraction)
    groups = labels.identity
    if task == "expression":
        train = train[labels.expression[train] >= 0]
        test = test[labels.expression[test] >= 0]
        _require(train, test, labels.name, "expression labels (expression >= 0)")
        y = labels.expression
        grp = groups[train] if (groups[train] != "").all() else None
        out = linear_probe(
            features[train], y[train], features[test], y[test], NUM_EXPRESSIONS, cfg.probes, seed, grp
        )
        out["metrics"].update(
            knn_probe(features[train], y[train], features[test], y[test], NUM_EXPRESSIONS, cfg.probes)
        )
        return out
    if task == "va":
        va = np.stack([labels.valence, labels.arousal], axis=1).astype(np.float64)
        ok = np.isfinite(va).all(axis=1)
        train, test = train[ok[train]], test[ok[test]]
        _require(train, test, labels.name, "valence/arousal labels")
        grp = groups[train] if (groups[train] != "").all() else None
        return va_regression(features[train], va[train], features[test], va[test], cfg.probes, seed, grp)
    if task == "identity":
        gallery, probe = gallery_probe_split(labels.identity, seed, labels.clip)
        _require(gallery, probe, labels.name, "identities with >= 2 clips (or images without clip ids)")
        return identity_leakage(features, labels.identity, gallery, probe, cfg.probes, seed, labels.clip)
    raise ValueError(f"unknown probe task {task!r}")


def finetune_task(checkpoint: str, data: FramesData, seed: int, cfg: EvalConfig) -> dict:
    labels = data.labels()
    train, test = train_test_split(labels, seed, cfg.test_fraction)
    train = train[labels.expression[train] >= 0]
    test = test[labels.expression[test] >= 0]
    _require(train, test, labels.name, "expression labels (expression >= 0)")
    grp = labels.identity[train] if (labels.identity[train] != "").all() else None
    return finetune(
        checkpoint,
        [data.jpegs[i] for i in train],
        labels.expression[train],
        [data.jpegs[i] for i in test],
        labels.expression[test],
        NUM_EXPRESSIONS,
        cfg.finetune,
        seed,
        grp,
    )


def _require(train: np.ndarray, test: np.ndarray, name: str, what: str) -> None:
    if len(train) < 2 or len(test) < 1:
        raise ValueError(
            f"dataset '{name}' has too few samples with {what} for this task "
            f"({len(train)} train / {len(test)} test): drop the task for it or use a labelled dataset"
        )


# ---------------------------------------------------------------- driver


def ray_env_defaults() -> None:
    """Loopback-only, no telemetry, explicit auth mode (see docs/ENVIRONMENT notes on Ray 2.60)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def init_ray(cfg: RayConfig) -> bool:
    """Connect to (or start) Ray; returns True when this call started it (so the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    ray_env_defaults()
    if cfg.address == "local":
        ray.init(
            address="local",
            num_cpus=cfg.local_cpus,
            include_dashboard=False,
            object_store_memory=cfg.object_store_memory,
            _node_ip_address="127.0.0.1",
            logging_level="WARNING",
        )
    else:
        ray.init(address=cfg.address, logging_level="WARNING")
    return True


@dataclass
class _Pending:
    ref: Any
    checkpoint: str
    task: str
    dataset: str
    seed: int
    request: dict[str, float]
    needs: list[
        tuple[str, Any, dict[str, float]]
    ]  # upstream (stage, ref, request): to say which stage is stuck


def _submit(cfg: EvalConfig, names: list[str], datasets: list[str]) -> tuple[list[_Pending], dict, dict]:
    import ray

    has_gpu = ray.cluster_resources().get("GPU", 0) > 0
    gpus = (1.0 if has_gpu else 0.0) if cfg.ray.gpus_per_task < 0 else cfg.ray.gpus_per_task
    common = {"max_retries": cfg.ray.max_retries, "retry_exceptions": [OSError]}
    cpu_req = {"num_cpus": cfg.ray.cpus_per_task}
    dev_req = {"num_cpus": cfg.ray.cpus_per_task, "num_gpus": gpus}
    probe_req = {"num_cpus": cfg.ray.cpus_per_task, "num_gpus": cfg.ray.probe_gpus}

    load = ray.remote(load_task).options(**common, **cpu_req)
    feats = ray.remote(features_task).options(**common, **dev_req)
    streamed = ray.remote(stream_task).options(**common, **dev_req, num_returns=2)
    probe = ray.remote(probe_task).options(**common, **probe_req)
    tune = ray.remote(finetune_task).options(**common, **dev_req)
    cfg_ref = ray.put(cfg)

    probe_tasks = [t for t in cfg.tasks if t != "finetune"]
    in_memory = "finetune" in cfg.tasks or not cfg.stream  # fine-tuning needs the pixels
    data_refs = {url: load.remote(url, cfg.max_samples) for url in cfg.data} if in_memory else {}
    label_refs: dict[str, Any] = {}
    if not cfg.stream:
        label_refs = {
            url: ray.remote(_labels_of).options(**common, **cpu_req).remote(data_refs[url])
            for url in cfg.data
        }
    feature_refs: dict[tuple[str, str], Any] = {}
    pending: list[_Pending] = []
    for ckpt, name in zip(cfg.checkpoints, names):
        for url, dname in zip(cfg.data, datasets):
            feature_needs: list[tuple[str, Any, dict[str, float]]] = []
            if probe_tasks and cfg.stream:
                features, labels = streamed.remote(ckpt, url, cfg.features, cfg.max_samples)
                feature_refs[(name, dname)] = features
                label_refs.setdefault(url, labels)  # the same labels from every checkpoint's stream
                feature_needs = [("features", features, _request(dev_req))]
            elif probe_tasks:
                feature_refs[(name, dname)] = feats.remote(ckpt, data_refs[url], cfg.features)
                feature_needs = [
                    ("load", data_refs[url], _request(cpu_req)),
                    ("features", feature_refs[(name, dname)], _request(dev_req)),
                ]
            for task in cfg.tasks:
                for seed in range(cfg.seeds):
                    if task == "finetune":
                        ref = tune.remote(ckpt, data_refs[url], seed, cfg_ref)
                        needs, req = [("load", data_refs[url], _request(cpu_req))], dev_req
                    else:
                        ref = probe.remote(task, feature_refs[(name, dname)], label_refs[url], seed, cfg_ref)
                        needs, req = feature_needs, probe_req
                    pending.append(_Pending(ref, name, task, dname, seed, _request(req), needs))
    return pending, feature_refs, label_refs


def _labels_of(data: FramesData) -> FramesLabels:
    return data.labels()


def _request(options: dict[str, float]) -> dict[str, float]:
    return {"CPU": options.get("num_cpus", 0), "GPU": options.get("num_gpus", 0)}


def _timeout_message(stuck: list[_Pending], timeout_s: float) -> str:
    import ray

    total = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
    lines = [
        f"no evaluation task finished within ray.task_timeout_s={timeout_s:g} s; {len(stuck)} still pending:"
    ]
    for item in stuck[:8]:
        waiting_on = [
            f"{stage} (requests {request})"
            for stage, ref, request in item.needs
            if not ray.wait([ref], timeout=0)[0]
        ]
        stage = (
            f"waiting for {', '.join(waiting_on)}" if waiting_on else f"not started (requests {item.request})"
        )
        lines.append(f"  {item.checkpoint} / {item.task} / {item.dataset} / seed {item.seed}: {stage}")
    lines.append(f"cluster resources: total {total}, available {free}.")
    requests = [i.request for i in stuck] + [r for i in stuck for _, _, r in i.needs]
    if any(r.get("GPU", 0) > total.get("GPU", 0) for r in requests):
        lines.append(
            "A request no node can satisfy (e.g. a GPU on a CPU-only cluster) waits forever: set "
            "ray.gpus_per_task=0 (or -1 for auto), add GPU nodes, or raise ray.task_timeout_s for long tasks."
        )
    else:
        lines.append("Raise ray.task_timeout_s if single tasks legitimately take longer.")
    return "\n".join(lines)


def gather(
    pending: list[_Pending],
    timeout_s: float,
    progress: bool = True,
    on_done: Callable[[_Pending, Any], None] | None = None,
) -> list[tuple[_Pending, Any]]:
    """Wait for every task; failures become exception values; a stall longer than ``timeout_s`` raises."""
    import ray
    from tqdm import tqdm

    by_ref = {p.ref: p for p in pending}
    waiting = list(by_ref)
    done: list[tuple[_Pending, Any]] = []
    bar = tqdm(total=len(pending), desc="eval tasks", unit="task", disable=not progress)
    last_progress = time.monotonic()
    try:
        while waiting:
            remaining = timeout_s - (time.monotonic() - last_progress)
            ready, waiting = ray.wait(waiting, num_returns=1, timeout=max(remaining, 0.0))
            if not ready:
                stuck = [by_ref[r] for r in waiting]
                message = _timeout_message(stuck, timeout_s)
                for ref in waiting:
                    ray.cancel(ref, force=True)
                raise EvalTimeout(message)
            for ref in ready:
                try:
                    value = ray.get(ref, timeout=timeout_s)
                except Exception as err:  # noqa: BLE001 - a failed cell is reported, not fatal
                    value = err
                done.append((by_ref[ref], value))
                bar.update(1)
                if on_done is not None:
                    on_done(by_ref[ref], value)
            last_progress = time.monotonic()
    finally:
        bar.close()
    return done


def _summary(values: list[float], seeds: list[int]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(np.nanmean(arr)) if np.isfinite(arr).any() else None,
        "std": float(np.nanstd(arr)) if np.isfinite(arr).any() else None,
        "seeds": seeds,
        "values": [None if not np.isfinite(v) else float(v) for v in arr],
    }


def assemble(cfg: EvalConfig, names: list[str], done: list[tuple[_Pending, Any]]) -> dict[str, Any]:
    """Per checkpoint -> task -> dataset: metric summaries over seeds, summed confusion matrix, errors."""
    cells: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for item, value in sorted(done, key=lambda d: (d[0].checkpoint, d[0].task, d[0].dataset, d[0].seed)):
        cell = (
            cells.setdefault(item.checkpoint, {})
            .setdefault(item.task, {})
            .setdefault(item.dataset, {"per_seed": {}, "errors": []})
        )
        if isinstance(value, Exception):
            cell["errors"].append({"seed": item.seed, "error": _short_error(value)})
            continue
        cell["per_seed"][item.seed] = value
    results: dict[str, Any] = {}
    for ckpt, tasks in cells.items():
        for task, dsets in tasks.items():
            for dname, cell in dsets.items():
                seeds = sorted(cell["per_seed"])
                metric_names = sorted({m for s in seeds for m in cell["per_seed"][s]["metrics"]})
                out: dict[str, Any] = {
                    "metrics": {
                        m: _summary([cell["per_seed"][s]["metrics"].get(m, np.nan) for s in seeds], seeds)
                        for m in metric_names
                    },
                    "errors": cell["errors"],
                }
                confusions = [
                    cell["per_seed"][s]["confusion"] for s in seeds if "confusion" in cell["per_seed"][s]
                ]
                if confusions:
                    out["confusion"] = np.sum(confusions, axis=0).tolist()
                results.setdefault(ckpt, {}).setdefault(task, {})[dname] = out
    return results


def _short_error(err: Exception) -> str:
    """The root cause of a (possibly wrapped) Ray task error, without Ray's traceback banner."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, Exception):
        err = cause
    return f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"


def run_eval(
    cfg: EvalConfig, progress: bool = True, on_features: Callable[[dict, dict], None] | None = None
) -> dict[str, Any]:
    """Validate inputs, fan out on Ray, gather, and return the ``results.json`` document (not written here)."""
    import ray

    cfg.validate()
    cfg.check_inputs()
    for url in cfg.data:
        check_dataset(url)
    names = checkpoint_names(cfg.checkpoints)
    datasets = [dataset_name(url) for url in cfg.data]
    if len(set(datasets)) != len(datasets):
        raise ConfigError(f"--data: two datasets share the name (last path part) in {cfg.data}; rename one")
    started = init_ray(cfg.ray)
    try:
        start = time.monotonic()
        pending, feature_refs, label_refs = _submit(cfg, names, datasets)
        pusher = None
        if cfg.pushgateway:
            from eval.pushgateway import EvalPusher

            cells = [(p.checkpoint, p.task, p.dataset) for p in pending]
            pusher = EvalPusher(cfg.pushgateway, Path(cfg.out).name or "eval", cells)
        done = gather(pending, cfg.ray.task_timeout_s, progress, pusher.cell_done if pusher else None)
        results = assemble(cfg, names, done)
        if pusher is not None:
            pusher.results(results)
        if on_features is not None and feature_refs:
            # Features for the report's projections; each already computed, so a short wait suffices.
            feats = {k: _get_or_none(v, cfg.ray.task_timeout_s) for k, v in feature_refs.items()}
            labels = {dataset_name(u): _get_or_none(v, cfg.ray.task_timeout_s) for u, v in label_refs.items()}
            on_features(feats, labels)
        return {
            "schema_version": 1,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "wall_s": round(time.monotonic() - start, 2),
            "checkpoints": dict(zip(names, cfg.checkpoints)),
            "datasets": dict(zip(datasets, cfg.data)),
            "tasks": list(cfg.tasks),
            "seeds": list(range(cfg.seeds)),
            "cluster": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")},
            "results": results,
        }
    finally:
        if started:
            ray.shutdown()


def _get_or_none(ref: Any, timeout_s: float) -> Any:
    import ray

    try:
        return ray.get(ref, timeout=timeout_s)
    except Exception:  # noqa: BLE001 - a failed feature task already shows up as cell errors
        return None

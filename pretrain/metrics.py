"""Prometheus metrics of a training rank.

One HTTP exporter per rank on 127.0.0.1:(port_base + local_rank); labels ``rank``, ``node``, ``run``
(never ``job``: Prometheus reserves it and would rename ours to ``exported_job``). Each rank owns its own
``CollectorRegistry`` so several ranks in one process (tests) never collide. Rank 0 gathers every rank's
``host:port`` and writes a file-based service-discovery file ``metrics.file_sd_dir/RUN.json`` listing the run's
targets (:func:`publish_targets`, :func:`write_file_sd`); it is removed when the run ends.

Per step the engine feeds only host-side numbers (timings, counts, LR: no device synchronisation); losses and
MaskFN rates are set on logging steps from the values already reduced for ``metrics.jsonl``.

Names follow Prometheus conventions (``promtool check metrics`` is clean, a test runs it): counters end in
``_total``, base units (``_seconds``, ``_bytes``), fractions are ``_ratio`` (0..1), peaks say ``_peak``.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from common.errors import ConfigError

STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# A checkpoint save (every rank's shards, then a mirror upload) takes seconds to minutes, not a step's time.
CHECKPOINT_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 180.0, 300.0, 600.0, 900.0)


@dataclass
class MetricsConfig:
    enabled: bool = True  # start the per-rank Prometheus exporter
    port_base: int = 9400  # rank r exports on port_base + local_rank; 0 picks free ports (tests)
    address: str = "127.0.0.1"  # exporter bind address (loopback unless SSLFER_METRICS_PUBLIC=1)
    file_sd_dir: str = "runs/prometheus_targets"  # the run writes FILE_SD_DIR/RUN.json listing its targets
    run: str = ""  # the `run` label and file-SD name; empty: the last part of run_dir
    linger_s: float = 0.0  # keep exporters up this long after the last step (short runs: last scrape)

    def validate(self) -> None:

        if self.address not in ("127.0.0.1", "localhost", "::1") and not os.environ.get(
            "SSLFER_METRICS_PUBLIC"
        ):
            raise ConfigError(
                f"config key 'metrics.address': {self.address!r} would expose metrics beyond loopback; "
                "set SSLFER_METRICS_PUBLIC=1 if that is intended on your cluster"
            )
        if not 0 <= self.port_base < 65000:
            raise ConfigError(f"config key 'metrics.port_base': must be 0..64999, got {self.port_base}")
        if self.linger_s < 0:
            raise ConfigError(f"config key 'metrics.linger_s': must be >= 0, got {self.linger_s}")
        if self.run and not all(c.isalnum() or c in "-_." for c in self.run):
            raise ConfigError(
                f"config key 'metrics.run': use letters, digits, '-', '_', '.', got {self.run!r}"
            )


class TrainMetrics:
    """Counters, gauges and histograms a dashboard shows, for one rank."""

    def __init__(self, cfg: MetricsConfig, rank: int, local_rank: int, run: str, node: str | None = None):
        self.cfg = cfg
        self.registry = CollectorRegistry()
        self.labels = {"rank": str(rank), "node": node or socket.gethostname(), "run": run}
        names = list(self.labels)
        r = self.registry

        def counter(name, doc, extra=()):
            return Counter(name, doc, names + list(extra), registry=r)

        def gauge(name, doc, extra=()):
            return Gauge(name, doc, names + list(extra), registry=r)

        self.samples = counter("sslfer_samples", "Clips consumed by training")
        self.images = counter("sslfer_images", "Images (views) processed by training")
        self.steps = counter("sslfer_steps", "Optimizer steps completed")
        self.step_seconds = Histogram(
            "sslfer_step_seconds", "Wall time of a training step", names, buckets=STEP_BUCKETS, registry=r
        )
        self.data_wait_seconds = counter("sslfer_data_wait_seconds", "Time spent waiting for input batches")
        self.data_wait_ratio = gauge(
            "sslfer_data_wait_ratio", "Data wait / step time of the last step (0..1)"
        )
        self.allgather_seconds = counter("sslfer_allgather_seconds", "Time in the embedding all-gather")
        self.loss = gauge("sslfer_loss", "Training loss by term (total, l1, l2)", ["term"])
        self.maskfn_pick_ratio = gauge(
            "sslfer_maskfn_pick_ratio", "Fraction of rows where MaskFN picked a negative (0..1)"
        )
        self.maskfn_same_identity_ratio = gauge(
            "sslfer_maskfn_same_identity_ratio",
            "Fraction of MaskFN picks that are the same-clip hard negative (0..1)",
        )
        self.positive_top1 = gauge(
            "sslfer_positive_top1_ratio", "Share of rows whose positive beats every negative (all ranks)"
        )
        self.collapse_suspected = gauge(
            "sslfer_collapse_suspected",
            "1 when positive top-1 has stayed at chance for collapse.window_steps",
        )
        self.lr = gauge("sslfer_learning_rate", "Current learning rate")
        self.device_memory_peak = gauge(
            "sslfer_device_memory_peak_bytes", "Peak accelerator memory allocated by this rank"
        )
        self.host_memory_peak = gauge(
            "sslfer_host_memory_peak_bytes", "Peak resident host memory of this rank"
        )
        self.skipped = counter("sslfer_skipped_samples", "Samples skipped by reason", ["reason"])
        self.checkpoint_seconds = Histogram(
            "sslfer_checkpoint_save_seconds",
            "Checkpoint save time",
            names,
            buckets=CHECKPOINT_BUCKETS,
            registry=r,
        )
        self.store_bytes = counter("sslfer_store_read_bytes", "Bytes read from the object store / shards")
        self.port: int | None = None
        self._server = None
        self._skipped_seen: dict[str, float] = {}
        self._store_bytes_seen = 0

    def start(self, local_rank: int) -> int | None:
        """Start the HTTP exporter; returns the port (None when disabled)."""
        if not self.cfg.enabled:
            return None
        port = self.cfg.port_base + local_rank if self.cfg.port_base else 0
        self._server, _thread = start_http_server(port, addr=self.cfg.address, registry=self.registry)
        self.port = self._server.server_port
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def close(self, file_sd: str | Path | None = None) -> None:
        """End of a run: serve ``linger_s`` more seconds (the last values get scraped), stop, drop the targets."""
        if self._server is not None and self.cfg.linger_s > 0:
            time.sleep(self.cfg.linger_s)
        self.stop()
        if file_sd is not None:
            Path(file_sd).unlink(missing_ok=True)

    def _l(self, metric, **extra):
        return metric.labels(**self.labels, **extra)

    def observe_step(
        self,
        *,
        step_seconds: float,
        data_wait_seconds: float,
        allgather_seconds: float,
        clips: int,
        images: int,
        lr: float,
        loss: float | None = None,
        l1: float | None = None,
        l2: float | None = None,
        pick_rate: float | None = None,
        same_identity_rate: float | None = None,
    ) -> None:
        """One optimizer step of this rank (``clips``/``images`` this rank consumed in it)."""
        self._l(self.steps).inc()
        self._l(self.samples).inc(clips)
        self._l(self.images).inc(images)
        self._l(self.step_seconds).observe(step_seconds)
        self._l(self.data_wait_seconds).inc(data_wait_seconds)
        self._l(self.data_wait_ratio).set(data_wait_seconds / step_seconds if step_seconds > 0 else 0.0)
        self._l(self.allgather_seconds).inc(allgather_seconds)
        self._l(self.lr).set(lr)
        if loss is not None:
            self.set_losses(loss, l1, l2, pick_rate, same_identity_rate)

    def set_health(self, positive_top1: float, collapse_suspected: bool) -> None:
        """Training health on logging steps: positive top-1 and the collapse detector's verdict."""
        self._l(self.positive_top1).set(positive_top1)
        self._l(self.collapse_suspected).set(1.0 if collapse_suspected else 0.0)

    def set_losses(
        self,
        loss: float,
        l1: float | None = None,
        l2: float | None = None,
        pick_rate: float | None = None,
        same_identity_rate: float | None = None,
    ) -> None:
        """Loss terms, MaskFN rates and memory peaks (logging steps: reading them may synchronise)."""
        self._l(self.loss, term="total").set(loss)
        if l1 is not None:
            self._l(self.loss, term="l1").set(l1)
        if l2 is not None:
            self._l(self.loss, term="l2").set(l2)
        if pick_rate is not None:
            self._l(self.maskfn_pick_ratio).set(pick_rate)
        if same_identity_rate is not None:
            self._l(self.maskfn_same_identity_ratio).set(same_identity_rate)
        self._l(self.host_memory_peak).set(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        try:
            import torch

            if torch.cuda.is_available():
                self._l(self.device_memory_peak).set(torch.cuda.max_memory_allocated())
        except ImportError:
            pass

    def set_skipped(self, counts: dict[str, int | float]) -> None:
        """Sync cumulative skip counts (by reason) from the input pipeline."""
        for reason, total in counts.items():
            delta = float(total) - self._skipped_seen.get(reason, 0.0)
            if delta > 0:
                self._l(self.skipped, reason=reason).inc(delta)
                self._skipped_seen[reason] = float(total)

    def set_store_bytes(self, total: int) -> None:
        delta = total - self._store_bytes_seen
        if delta > 0:
            self._l(self.store_bytes).inc(delta)
            self._store_bytes_seen = total

    def observe_checkpoint(self, seconds: float) -> None:
        self._l(self.checkpoint_seconds).observe(seconds)


def write_file_sd(path: str | Path, targets: list[str], labels: dict[str, str]) -> Path:
    """Prometheus file-based service discovery: one group listing the run's rank exporters."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([{"targets": sorted(targets), "labels": labels}], indent=2))
    tmp.replace(path)  # Prometheus may read it at any moment: publish atomically
    return path


def target_host(address: str) -> str:
    """The host Prometheus should scrape for an exporter bound to ``address``."""
    if address in ("0.0.0.0", "::", ""):
        return socket.getfqdn()
    return "127.0.0.1" if address == "localhost" else address


def file_sd_path(cfg: MetricsConfig, run: str) -> Path:
    return Path(cfg.file_sd_dir) / f"{run}.json"


def publish_targets(metrics: TrainMetrics | None, enabled: bool) -> Path | None:
    """Gather every rank's ``host:port`` (a collective: call on every rank); rank 0 writes the file-SD file.

    ``enabled`` must be the same on all ranks (``metrics.enabled``); returns the file's path on rank 0.
    """
    from pretrain import distributed

    if not enabled:
        return None
    mine = f"{target_host(metrics.cfg.address)}:{metrics.port}" if metrics and metrics.port else None
    everyone = distributed.all_gather_object(mine)
    if not distributed.is_main() or metrics is None:
        return None
    targets = [t for t in everyone if t]
    return write_file_sd(
        file_sd_path(metrics.cfg, metrics.labels["run"]), targets, {"sslfer_run": metrics.labels["run"]}
    )

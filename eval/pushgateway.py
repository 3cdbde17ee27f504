"""Evaluation progress and results pushed to a Prometheus Pushgateway (``--pushgateway URL`` / ``pushgateway``).

An evaluation is a batch job, not a long-lived server, so it pushes instead of being scraped. One group per run
(``job="sslfer_eval"``, ``eval_run=<basename of --out>``), replaced on every push, holding:

| metric | labels | meaning |
|---|---|---|
| ``sslfer_eval_cells`` | checkpoint, task, dataset | (seed) cells to compute |
| ``sslfer_eval_cells_done`` | checkpoint, task, dataset | cells finished, failed ones included |
| ``sslfer_eval_cells_failed`` | checkpoint, task, dataset | cells that raised |
| ``sslfer_eval_metric`` | checkpoint, task, dataset, metric | mean over seeds (pushed at the end) |
| ``sslfer_eval_metric_std`` | checkpoint, task, dataset, metric | std over seeds |
| ``sslfer_eval_finished`` | | 1 once results are pushed |
| ``sslfer_eval_last_push_timestamp_seconds`` | | time of the push |

All are gauges (values set on each push, which replaces the group), so none ends in ``_total``. Progress is
pushed at most once a second (and always at the end). A gateway that cannot be reached is reported
once on stderr and never fails the evaluation. Scrape the gateway with ``honor_labels: true`` (see
``launch/dashboards/prometheus.yml``).
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from typing import Any

JOB = "sslfer_eval"


class EvalPusher:
    def __init__(self, url: str, run: str, cells: list[tuple[str, str, str]], min_interval_s: float = 1.0):
        from prometheus_client import CollectorRegistry, Gauge

        self.url, self.run, self.min_interval_s = url, run, min_interval_s
        self.registry = r = CollectorRegistry()
        keys = ["checkpoint", "task", "dataset"]
        self.total = Gauge("sslfer_eval_cells", "Evaluation cells (seeds) to compute", keys, registry=r)
        self.done = Gauge("sslfer_eval_cells_done", "Evaluation cells finished", keys, registry=r)
        self.failed = Gauge("sslfer_eval_cells_failed", "Evaluation cells that failed", keys, registry=r)
        self.mean = Gauge("sslfer_eval_metric", "Metric mean over seeds", [*keys, "metric"], registry=r)
        self.std = Gauge("sslfer_eval_metric_std", "Metric std over seeds", [*keys, "metric"], registry=r)
        self.finished = Gauge("sslfer_eval_finished", "1 once the results are pushed", registry=r)
        self.stamp = Gauge("sslfer_eval_last_push_timestamp_seconds", "Time of the last push", registry=r)
        for key, n in Counter(cells).items():
            self.total.labels(*key).set(n)
            self.done.labels(*key).set(0)
            self.failed.labels(*key).set(0)
        self._last = 0.0
        self._warned = False
        self.push(force=True)

    def cell_done(self, item: Any, value: Any) -> None:
        """One (checkpoint, task, dataset, seed) cell finished; ``value`` is its result or exception."""
        key = (item.checkpoint, item.task, item.dataset)
        self.done.labels(*key).inc()
        if isinstance(value, Exception):
            self.failed.labels(*key).inc()
        self.push()

    def results(self, results: dict[str, Any]) -> None:
        """The ``results`` part of results.json: ckpt -> task -> dataset -> {"metrics": {m: {"mean", "std"}}}."""
        for ckpt, tasks in results.items():
            for task, datasets in tasks.items():
                for dataset, cell in datasets.items():
                    for metric, summary in cell.get("metrics", {}).items():
                        if summary.get("mean") is not None:
                            self.mean.labels(ckpt, task, dataset, metric).set(summary["mean"])
                        if summary.get("std") is not None:
                            self.std.labels(ckpt, task, dataset, metric).set(summary["std"])
        self.finished.set(1)
        self.push(force=True)

    def push(self, force: bool = False) -> bool:
        from prometheus_client import push_to_gateway

        now = time.monotonic()
        if not force and now - self._last < self.min_interval_s:
            return False
        self._last = now
        self.stamp.set(time.time())
        try:
            push_to_gateway(
                self.url, job=JOB, grouping_key={"eval_run": self.run}, registry=self.registry, timeout=5
            )
        except OSError as err:
            if not self._warned:
                print(f"warning: --pushgateway {self.url}: push failed ({err}); continuing", file=sys.stderr)
                self._warned = True
            return False
        return True

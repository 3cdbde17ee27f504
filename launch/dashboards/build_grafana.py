"""Regenerate grafana_sslfer.json: python launch/dashboards/build_grafana.py

Every PromQL expression here names metrics that pretrain/metrics.py exports or eval/pushgateway.py pushes (a
test checks it). Rates use Grafana's ``$__rate_interval`` (at least four scrape intervals, whatever the zoom);
only the checkpoint-save quantile keeps a fixed 10 minute window, saves being minutes apart. A panel is
``(title, exprs, unit)`` or ``(title, exprs, unit, legend)``; an expr may be ``(expr, legend)``."""

from __future__ import annotations

import json
from pathlib import Path

PANELS = [
    (
        "Throughput, all ranks (images/s)",
        'sum by (run) (rate(sslfer_images_total{run=~"$run"}[$__rate_interval]))',
        "short",
    ),
    (
        "Throughput per rank (images/s)",
        'sum by (run, rank) (rate(sslfer_images_total{run=~"$run"}[$__rate_interval]))',
        "short",
    ),
    (
        "Clips/s, all ranks",
        'sum by (run) (rate(sslfer_samples_total{run=~"$run"}[$__rate_interval]))',
        "short",
    ),
    (
        "Data wait (share of step time)",
        'sum by (run, rank) (rate(sslfer_data_wait_seconds_total{run=~"$run"}[$__rate_interval]))'
        ' / sum by (run, rank) (rate(sslfer_step_seconds_sum{run=~"$run"}[$__rate_interval]))',
        "percentunit",
    ),
    (
        "Step time p50 / p99 (s)",
        [
            'histogram_quantile(0.5, sum by (run, le) (rate(sslfer_step_seconds_bucket{run=~"$run"}[$__rate_interval])))',
            'histogram_quantile(0.99, sum by (run, le) (rate(sslfer_step_seconds_bucket{run=~"$run"}[$__rate_interval])))',
        ],
        "s",
    ),
    (
        "All-gather time per second",
        'sum by (run, rank) (rate(sslfer_allgather_seconds_total{run=~"$run"}[$__rate_interval]))',
        "s",
    ),
    ("Loss terms", 'avg by (run, term) (sslfer_loss{run=~"$run"})', "short"),
    (
        "MaskFN pick ratio / same-identity share",
        [
            ('avg by (run) (sslfer_maskfn_pick_ratio{run=~"$run"})', "{{run}} pick"),
            ('avg by (run) (sslfer_maskfn_same_identity_ratio{run=~"$run"})', "{{run}} same identity"),
        ],
        "percentunit",
    ),
    (
        "Positive top-1 / collapse suspected",
        [
            'avg by (run) (sslfer_positive_top1_ratio{run=~"$run"})',
            'max by (run) (sslfer_collapse_suspected{run=~"$run"})',
        ],
        "percentunit",
    ),
    ("Learning rate", 'max by (run) (sslfer_learning_rate{run=~"$run"})', "short"),
    (
        "Peak memory per rank (bytes)",
        [
            ('max by (run, rank) (sslfer_device_memory_peak_bytes{run=~"$run"})', "{{run}} {{rank}} device"),
            ('max by (run, rank) (sslfer_host_memory_peak_bytes{run=~"$run"})', "{{run}} {{rank}} host"),
        ],
        "bytes",
    ),
    (
        "Skipped samples by reason",
        'sum by (run, reason) (sslfer_skipped_samples_total{run=~"$run"})',
        "short",
    ),
    (
        "Checkpoint save time p99 (s)",
        'histogram_quantile(0.99, sum by (run, le) (rate(sslfer_checkpoint_save_seconds_bucket{run=~"$run"}[10m])))',
        "s",
    ),
    (
        "Object store read (bytes/s)",
        'sum by (run) (rate(sslfer_store_read_bytes_total{run=~"$run"}[$__rate_interval]))',
        "Bps",
    ),
    # Evaluations push to the Pushgateway (eval/pushgateway.py): job="sslfer_eval", eval_run=<basename of --out>.
    (
        "Evaluation progress (share of cells done / failed)",
        [
            (
                'sum by (eval_run) (sslfer_eval_cells_done{eval_run=~"$eval_run"})'
                ' / sum by (eval_run) (sslfer_eval_cells{eval_run=~"$eval_run"})',
                "{{eval_run}} done",
            ),
            (
                'sum by (eval_run) (sslfer_eval_cells_failed{eval_run=~"$eval_run"})'
                ' / sum by (eval_run) (sslfer_eval_cells{eval_run=~"$eval_run"})',
                "{{eval_run}} failed",
            ),
        ],
        "percentunit",
    ),
    (
        "Evaluation results (mean over seeds)",
        'max by (eval_run, checkpoint, task, dataset, metric) (sslfer_eval_metric{eval_run=~"$eval_run"})',
        "short",
        "{{eval_run}} {{checkpoint}} {{task}}/{{dataset}} {{metric}}",
    ),
]

LEGEND = "{{run}} {{rank}} {{term}} {{reason}}"


def build() -> dict:
    panels = []
    for i, (title, exprs, unit, *legend) in enumerate(PANELS):
        exprs = exprs if isinstance(exprs, list) else [exprs]
        exprs = [e if isinstance(e, tuple) else (e, legend[0] if legend else LEGEND) for e in exprs]
        panels.append(
            {
                "id": i + 1,
                "type": "timeseries",
                "title": title,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [
                    {"refId": chr(65 + j), "expr": e, "legendFormat": fmt} for j, (e, fmt) in enumerate(exprs)
                ],
            }
        )
    return {
        "title": "sslfer pretraining",
        "uid": "sslfer-pretraining",
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "10s",
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus"},
                {
                    "name": "run",
                    "type": "query",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": "label_values(sslfer_steps_total, run)",
                    "includeAll": True,
                    "multi": True,
                    "current": {"text": "All", "value": "$__all"},
                },
                {
                    "name": "eval_run",
                    "type": "query",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": "label_values(sslfer_eval_cells, eval_run)",
                    "includeAll": True,
                    "multi": True,
                    "current": {"text": "All", "value": "$__all"},
                },
            ]
        },
        "panels": panels,
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("grafana_sslfer.json")
    out.write_text(json.dumps(build(), indent=2) + "\n")
    print(f"wrote {out}")

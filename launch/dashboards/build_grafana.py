"""Regenerate grafana_sslfer.json: python launch/dashboards/build_grafana.py

Every PromQL expression here names metrics that pretrain/metrics.py exports (a test checks it)."""

from __future__ import annotations

import json
from pathlib import Path

PANELS = [
    (
        "Throughput, all ranks (images/s)",
        'sum by (run) (rate(sslfer_images_total{run=~"$run"}[1m]))',
        "short",
    ),
    (
        "Throughput per rank (images/s)",
        'sum by (run, rank) (rate(sslfer_images_total{run=~"$run"}[1m]))',
        "short",
    ),
    ("Clips/s, all ranks", 'sum by (run) (rate(sslfer_samples_total{run=~"$run"}[1m]))', "short"),
    (
        "Data wait (% of step)",
        '100 * sum by (run, rank) (rate(sslfer_data_wait_seconds_total{run=~"$run"}[1m]))'
        ' / sum by (run, rank) (rate(sslfer_step_seconds_sum{run=~"$run"}[1m]))',
        "percent",
    ),
    (
        "Step time p50 / p99 (s)",
        [
            'histogram_quantile(0.5, sum by (run, le) (rate(sslfer_step_seconds_bucket{run=~"$run"}[1m])))',
            'histogram_quantile(0.99, sum by (run, le) (rate(sslfer_step_seconds_bucket{run=~"$run"}[1m])))',
        ],
        "s",
    ),
    (
        "All-gather time per second",
        'sum by (run, rank) (rate(sslfer_allgather_seconds_total{run=~"$run"}[1m]))',
        "s",
    ),
    ("Loss terms", 'avg by (run, term) (sslfer_loss{run=~"$run"})', "short"),
    (
        "MaskFN pick rate / same-identity share",
        [
            'avg by (run) (sslfer_maskfn_pick_rate{run=~"$run"})',
            'avg by (run) (sslfer_maskfn_same_identity_rate{run=~"$run"})',
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
        "Memory per rank (bytes)",
        [
            'max by (run, rank) (sslfer_device_memory_bytes{run=~"$run"})',
            'max by (run, rank) (sslfer_host_memory_bytes{run=~"$run"})',
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
        'sum by (run) (rate(sslfer_store_read_bytes_total{run=~"$run"}[1m]))',
        "Bps",
    ),
]


def build() -> dict:
    panels = []
    for i, (title, exprs, unit) in enumerate(PANELS):
        exprs = exprs if isinstance(exprs, list) else [exprs]
        panels.append(
            {
                "id": i + 1,
                "type": "timeseries",
                "title": title,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [
                    {"refId": chr(65 + j), "expr": e, "legendFormat": "{{run}} {{rank}} {{term}} {{reason}}"}
                    for j, e in enumerate(exprs)
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
            ]
        },
        "panels": panels,
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("grafana_sslfer.json")
    out.write_text(json.dumps(build(), indent=2) + "\n")
    print(f"wrote {out}")

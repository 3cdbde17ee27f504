"""Prometheus exporter, scrape config, recording rules and Grafana dashboard agree with each other, and the
exported names pass ``promtool check metrics`` (Prometheus's naming linter)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from common.errors import ConfigError
from launch.services import PrometheusServer
from pretrain.metrics import MetricsConfig, TrainMetrics, write_file_sd

DASHBOARDS = Path(__file__).resolve().parents[1] / "launch" / "dashboards"


def _exported_names(registry) -> set[str]:
    """Series names a registry declares (a device-memory gauge has no sample on a CPU-only rank)."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    return {f.name + s for f in registry.collect() for s in suffixes[f.type]}


def _eval_pusher(capsys=None):
    """An EvalPusher with progress and results (its gateway is unreachable: it warns once and carries on)."""
    from eval.pushgateway import EvalPusher
    from launch.services import free_port

    pusher = EvalPusher(f"http://127.0.0.1:{free_port()}", "lint", [("a", "expression", "d")] * 2)
    pusher.cell_done(type("Cell", (), {"checkpoint": "a", "task": "expression", "dataset": "d"})(), 0.5)
    pusher.results({"a": {"expression": {"d": {"metrics": {"linear_macro_f1": {"mean": 0.5, "std": 0.1}}}}}})
    return pusher


def _promtool_check_metrics(text: str) -> subprocess.CompletedProcess:
    promtool = shutil.which("promtool")
    assert promtool, (
        "promtool is not installed: it lints metric names (`promtool check metrics`); install the Debian "
        "package `prometheus` (make setup as root, or apt-get install prometheus)"
    )
    return subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )


def _observed_metrics() -> TrainMetrics:
    m = TrainMetrics(MetricsConfig(port_base=0), rank=1, local_rank=1, run="unit", node="n0")
    m.observe_step(
        step_seconds=0.2,
        data_wait_seconds=0.05,
        allgather_seconds=0.01,
        clips=4,
        images=16,
        loss=2.5,
        l1=2.0,
        l2=0.6,
        pick_rate=1.0,
        same_identity_rate=0.25,
        lr=1e-3,
    )
    m.set_skipped({"corrupt_jpeg": 2, "missing_landmarks": 1})
    m.set_skipped({"corrupt_jpeg": 3})
    m.set_store_bytes(1000)
    m.observe_checkpoint(0.5)
    return m


def test_exporter_values_and_labels():
    m = _observed_metrics()
    text = generate_latest(m.registry).decode()
    assert 'sslfer_images_total{node="n0",rank="1",run="unit"} 16.0' in text
    assert 'sslfer_data_wait_ratio{node="n0",rank="1",run="unit"} 0.25' in text
    # Skip counts are synced as cumulative totals: 2 then 3 -> 3, never double counted.
    assert 'sslfer_skipped_samples_total{node="n0",rank="1",reason="corrupt_jpeg",run="unit"} 3.0' in text
    assert 'term="l2"' in text and "job=" not in text


def test_http_exporter_serves_loopback_only():
    m = TrainMetrics(MetricsConfig(port_base=0), rank=0, local_rank=0, run="http")
    port = m.start(0)
    try:
        m.observe_step(
            step_seconds=0.1, data_wait_seconds=0.0, allgather_seconds=0.0, clips=1, images=4, loss=1, lr=0.1
        )
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "sslfer_steps_total" in body
        assert m._server.server_address[0] == "127.0.0.1"
    finally:
        m.stop()


def test_dashboard_queries_name_exported_metrics():
    exported = _exported_names(_observed_metrics().registry) | _exported_names(_eval_pusher().registry)
    dashboard = json.loads((DASHBOARDS / "grafana_sslfer.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    exprs += [
        r["expr"]
        for g in __import__("yaml").safe_load((DASHBOARDS / "recording_rules.yml").read_text())["groups"]
        for r in g["rules"]
    ]
    used = {name for e in exprs for name in re.findall(r"\bsslfer_[a-z0-9_]+\b", e)}
    assert len(used) >= 20 and "sslfer_positive_top1_ratio" in used
    missing = sorted(used - exported)
    assert not missing, f"dashboard/rules use metrics the exporter does not export: {missing}"


def test_dashboard_conventions():
    """Rates follow Grafana's $__rate_interval; the evaluation and collapse panels are there."""
    dashboard = json.loads((DASHBOARDS / "grafana_sslfer.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert not [e for e in exprs if "[1m]" in e]
    assert sum("[$__rate_interval]" in e for e in exprs) >= 8
    titles = {p["title"]: p for p in dashboard["panels"]}
    assert "Positive top-1 / collapse suspected" in titles
    evaluation = [t for p in dashboard["panels"] if p["title"].startswith("Evaluation") for t in p["targets"]]
    assert any("sslfer_eval_metric" in t["expr"] for t in evaluation)
    assert any("sslfer_eval_cells_done" in t["expr"] for t in evaluation)
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_metric_names_follow_prometheus_conventions():
    """Gauges never end in _total, fractions are _ratio, peaks say so; checkpoint saves get minute buckets."""
    registries = {"train": _observed_metrics().registry, "eval": _eval_pusher().registry}
    for where, registry in registries.items():
        for family in registry.collect():
            if family.type != "counter":
                assert not family.name.endswith("_total"), (where, family.name)
            # fractions are _ratio (the learning rate is a rate, not a fraction)
            assert not re.search(r"(_fraction|_percent|(?<!_learning)_rate)$", family.name), (
                where,
                family.name,
            )
    names = {f.name for f in registries["train"].collect()}
    assert {
        "sslfer_data_wait_ratio",
        "sslfer_maskfn_pick_ratio",
        "sslfer_maskfn_same_identity_ratio",
    } <= names
    assert {"sslfer_device_memory_peak_bytes", "sslfer_host_memory_peak_bytes"} <= names
    assert "sslfer_eval_cells" in {f.name for f in registries["eval"].collect()}
    m = _observed_metrics()
    m.observe_checkpoint(150.0)  # a save of 2.5 minutes lands in a finite bucket, not only in +Inf
    text = generate_latest(m.registry).decode()
    buckets = re.findall(r'sslfer_checkpoint_save_seconds_bucket\{[^}]*le="([^"]+)"[^}]*\} (\S+)', text)
    finite = [float(le) for le, _ in buckets if le != "+Inf"]
    assert max(finite) >= 300 and {le: float(v) for le, v in buckets}["180.0"] == 2.0
    step_buckets = re.findall(r'sslfer_step_seconds_bucket\{[^}]*le="([^"]+)"', text)
    assert finite != [float(le) for le in step_buckets if le != "+Inf"]


def test_promtool_check_metrics_on_a_scraped_exporter_and_the_eval_push():
    """What Prometheus scrapes from a real exporter (and what an evaluation pushes) passes promtool's linter."""
    m = _observed_metrics()
    m.set_health(positive_top1=0.5, collapse_suspected=False)
    port = m.start(0)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        m.stop()
    assert "sslfer_checkpoint_save_seconds_bucket" in body and "sslfer_positive_top1_ratio" in body
    for name, text in (("exporter", body), ("eval push", generate_latest(_eval_pusher().registry).decode())):
        out = _promtool_check_metrics(text)
        assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), (
            f"promtool check metrics ({name}):\n{out.stdout}{out.stderr}"
        )


def test_dashboard_json_is_current():
    from launch.dashboards.build_grafana import build

    assert json.loads((DASHBOARDS / "grafana_sslfer.json").read_text()) == build()


def test_promtool_validates_config_and_rules():
    assert shutil.which("promtool"), "promtool missing: run `make setup` as root (apt-get install prometheus)"
    out = subprocess.run(
        ["promtool", "check", "config", "prometheus.yml"], cwd=DASHBOARDS, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


@pytest.mark.integration
def test_real_prometheus_scrapes_exporter(tmp_path):
    m = TrainMetrics(MetricsConfig(port_base=0), rank=0, local_rank=0, run="scrape")
    port = m.start(0)
    try:
        with PrometheusServer(tmp_path / "prom") as prom:
            write_file_sd(tmp_path / "prom" / "targets" / "scrape.json", [f"127.0.0.1:{port}"], {})
            deadline = time.monotonic() + 30
            value = None
            while time.monotonic() < deadline:
                m.observe_step(
                    step_seconds=0.05,
                    data_wait_seconds=0.0,
                    allgather_seconds=0.0,
                    clips=2,
                    images=8,
                    loss=1,
                    lr=0.1,
                )
                time.sleep(0.05)
                result = prom.query('sslfer_images_total{run="scrape"}')
                if result and float(result[0]["value"][1]) > 100:
                    value = float(result[0]["value"][1])
                    break
            assert value is not None, "Prometheus never scraped the exporter"
            assert result[0]["metric"]["rank"] == "0"
    finally:
        m.stop()


def test_file_sd_published_by_rank0_and_removed_at_close(tmp_path):
    from pretrain.metrics import publish_targets

    cfg = MetricsConfig(port_base=0, file_sd_dir=str(tmp_path / "targets"), linger_s=0.2)
    m = TrainMetrics(cfg, rank=0, local_rank=0, run="sd-run", node="n0")
    port = m.start(0)
    path = publish_targets(m, True)  # single process: this rank is rank 0 and the whole world
    assert path == tmp_path / "targets" / "sd-run.json"
    assert json.loads(path.read_text()) == [
        {"targets": [f"127.0.0.1:{port}"], "labels": {"sslfer_run": "sd-run"}}
    ]
    assert publish_targets(None, False) is None
    t0 = time.monotonic()
    m.close(path)
    assert time.monotonic() - t0 >= 0.2 and not path.exists() and m._server is None


def test_step_counters_without_losses_then_losses_on_log_steps():
    m = TrainMetrics(MetricsConfig(port_base=0), rank=0, local_rank=0, run="split", node="n0")
    for _ in range(3):
        m.observe_step(
            step_seconds=0.5, data_wait_seconds=0.1, allgather_seconds=0.02, clips=2, images=8, lr=0.1
        )
    text = generate_latest(m.registry).decode()
    assert 'sslfer_steps_total{node="n0",rank="0",run="split"} 3.0' in text
    assert 'sslfer_allgather_seconds_total{node="n0",rank="0",run="split"} 0.06' in text
    assert "sslfer_loss{" not in text  # losses are set on logging steps only
    m.set_losses(1.5, 1.0, 0.625, pick_rate=1.0, same_identity_rate=0.5)
    text = generate_latest(m.registry).decode()
    assert 'sslfer_loss{node="n0",rank="0",run="split",term="l2"} 0.625' in text
    assert 'sslfer_maskfn_same_identity_ratio{node="n0",rank="0",run="split"} 0.5' in text


def test_metrics_config_errors_name_the_key():

    with pytest.raises(ConfigError, match="metrics.linger_s"):
        MetricsConfig(linger_s=-1).validate()
    with pytest.raises(ConfigError, match="metrics.run"):
        MetricsConfig(run="a b").validate()


def test_eval_pusher_survives_an_unreachable_gateway(capsys):
    from eval.pushgateway import EvalPusher
    from launch.services import free_port

    pusher = EvalPusher(f"http://127.0.0.1:{free_port()}", "nogw", [("a", "expression", "d")])
    pusher.cell_done(
        type("Cell", (), {"checkpoint": "a", "task": "expression", "dataset": "d"})(), ValueError()
    )
    pusher.results({"a": {"expression": {"d": {"metrics": {"linear_macro_f1": {"mean": 0.5, "std": 0.1}}}}}})
    err = capsys.readouterr().err
    assert err.count("push failed") == 1  # warned once, never raised
    text = generate_latest(pusher.registry).decode()
    assert 'sslfer_eval_cells_failed{checkpoint="a",dataset="d",task="expression"} 1.0' in text
    assert (
        'sslfer_eval_metric{checkpoint="a",dataset="d",metric="linear_macro_f1",task="expression"} 0.5'
        in text
    )

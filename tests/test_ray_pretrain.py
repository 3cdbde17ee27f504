"""Pretraining submitted to a real local Ray head through the Jobs API (Ray Train TorchTrainer, 2 CPU workers).

The head (``launch.ray_head.RayHead``, 2 CPUs, loopback) receives ``python -m launch.ray_pretrain`` as a job
(``launch.ray_submit.submit_and_wait``, this checkout as the working dir); two workers train a few steps of the
smoke config with DeepSpeed on gloo, write a checkpoint and backbone.pt, and their exporters are scraped by the
real Prometheus through the run's file-SD file while the job runs.
"""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import pytest

from common.errors import ConfigError
from launch.services import PrometheusServer
from tests.helpers import TINY_OVERRIDES as TINY
from tests.helpers import launcher_env as run_env
from tests.helpers import write_synth_clips
from tests.test_metrics_integration import SMOKE

REPO = Path(__file__).resolve().parents[1]


def test_prepare_config_makes_paths_absolute_and_checks_devices(tmp_path, monkeypatch):
    from launch.ray_pretrain import prepare_config

    monkeypatch.chdir(tmp_path)
    cfg = prepare_config(str(REPO / SMOKE), ["run_dir=runs/x", "metrics.enabled=true"], use_gpu=False)
    assert cfg.run_dir == str(tmp_path / "runs/x") and Path(cfg.data.url).is_absolute()
    assert cfg.metrics.run == "x" and Path(cfg.metrics.file_sd_dir).is_absolute()
    with pytest.raises(ConfigError, match="device"):
        prepare_config(str(REPO / SMOKE), ["device=cuda"], use_gpu=False)
    with pytest.raises(ConfigError, match="device"):
        prepare_config(str(REPO / SMOKE), ["device=cpu"], use_gpu=True)
    cfg = prepare_config(str(REPO / SMOKE), ["data.url=s3://b/clips", "device=auto"], use_gpu=True)
    assert cfg.data.url == "s3://b/clips"


@pytest.mark.integration
def test_ray_job_trains_checkpoints_and_is_scraped(tmp_path, monkeypatch):
    from common.ray_jobs import submit_and_wait
    from launch.ray_head import RayHead

    # The head's environment is its jobs' and workers': CPU DeepSpeed with the cached shm_comm build.
    for key, value in run_env().items():
        if key != "PYTHONPATH":
            monkeypatch.setenv(key, value)
    data = write_synth_clips(tmp_path / "clips")
    run = "raysmoke"
    run_dir = tmp_path / "runs" / run
    with (
        PrometheusServer(tmp_path / "prom", scrape_interval_s=1) as prom,
        RayHead(tmp_path / "head", num_cpus=2) as head,
    ):
        for key, value in head.client_env().items():  # the head requires its token
            monkeypatch.setenv(key, value)
        targets = tmp_path / "prom" / "targets"
        entry = ["python", "-m", "launch.ray_pretrain", "--config", SMOKE, "--num-workers", "2", *TINY,
                 f"data.url={data}", f"run_dir={run_dir}", "max_steps=8", "checkpoint_every=4", "log_every=2",
                 "data.num_workers=1", "metrics.enabled=true", "metrics.port_base=0", "metrics.linger_s=10",
                 f"metrics.file_sd_dir={targets}"]  # fmt: skip
        out = io.StringIO()
        result: dict = {}
        job = threading.Thread(
            target=lambda: result.update(
                rc=submit_and_wait(head.dashboard_url, entry, str(REPO), 240, out=out)
            ),
            daemon=True,
        )
        job.start()
        seen: list = []
        while job.is_alive():
            seen = prom.query(f'sslfer_steps_total{{run="{run}"}}')
            if len(seen) == 2 and min(float(s["value"][1]) for s in seen) >= 1:
                break
            time.sleep(0.5)
        job.join(timeout=250)
        log = out.getvalue()
        assert result.get("rc") == 0, log[-6000:]
    assert len(seen) == 2, f"Prometheus did not scrape both Ray workers' exporters: {seen}\n{log[-3000:]}"
    assert sorted(s["metric"]["rank"] for s in seen) == ["0", "1"]
    assert (run_dir / "backbone.pt").exists()
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((run_dir / "checkpoints" / latest / "meta.json").read_text())
    assert meta["step"] == 8
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]
    assert "pretraining finished" in log


def test_gpu_cluster_yaml_passes_ray_schema():
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "launch/cluster/gpu_cluster.yaml").read_text())
    validate_config(prepare_config(config))
    assert "launch.ray_pretrain" in (REPO / "launch/cluster/gpu_cluster.yaml").read_text()


def test_credentials_travel_in_the_runtime_env_not_the_trainer_config(tmp_path, monkeypatch):
    """Ray records and shows a trainer's config; the store secret must not be in it."""
    from launch.ray_pretrain import build_trainer, prepare_config, worker_env

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cret-value")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key-id")
    cfg = prepare_config(SMOKE, [f"run_dir={tmp_path / 'r'}", "data.url=s3://b/clips"], use_gpu=False)
    trainer = build_trainer(cfg, num_workers=2, use_gpu=False, cpus_per_worker=1.0, max_failures=0)
    assert set(trainer.train_loop_config) == {"cfg"}
    assert "s3cret-value" not in repr(trainer.train_loop_config)
    env = worker_env(use_gpu=False, cpus_per_worker=1.0)
    assert env["AWS_SECRET_ACCESS_KEY"] == "s3cret-value" and env["DS_ACCELERATOR"] == "cpu"

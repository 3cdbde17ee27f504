"""A real 2-rank DeepSpeed run scraped by the real Prometheus: the PromQL throughput agrees with metrics.jsonl.

The run is started with the real ``deepspeed --num_gpus 2 launch/pretrain.py`` launcher (CPU ranks, gloo) on a
small SynthFace dataset, exports metrics on free loopback ports and lists them in a file-SD file that the
Prometheus started here (Debian binary, loopback, 1 s scrapes) watches. After ~20 s of training
``sum(rate(sslfer_samples_total[W]))`` at a time T is compared with the trainer's own ``images_per_s`` of the
``metrics.jsonl`` lines of the same interval (images per clip = 4 in the [A, NA, P, NP] layout).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from launch.services import PrometheusServer
from tests.helpers import TINY_OVERRIDES, launcher_env, write_synth_clips

# A missing Prometheus/Pushgateway binary fails loudly (ServiceError naming `make setup`), never skips.
pytestmark = [pytest.mark.integration]

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SMOKE = "launch/configs/smoke.yaml"
TINY = TINY_OVERRIDES
WINDOW_S = 12
TRAIN_S = 20


def query_at(prom: PrometheusServer, promql: str, at: float) -> list[dict]:
    url = f"{prom.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql, "time": f"{at:.3f}"})
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def log_lines(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stop_run(proc: subprocess.Popen) -> None:
    """SIGTERM the run's process group (ranks checkpoint and exit), then SIGKILL whatever is left of it."""
    try:  # the `deepspeed` runner does not forward SIGTERM: signal the ranks too
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.time() + 60
    while time.time() < deadline:  # the ranks finish their step, checkpoint and exit
        proc.poll()
        try:
            os.killpg(proc.pid, 0)  # the group this test started (start_new_session=True)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def test_prometheus_rate_agrees_with_trainer_log(tmp_path):
    data = write_synth_clips(tmp_path / "clips")
    run = "promrate"
    run_dir = tmp_path / "runs" / run
    with PrometheusServer(tmp_path / "prom", scrape_interval_s=1) as prom:
        targets = tmp_path / "prom" / "targets"
        port = subprocess.check_output(
            [sys.executable, "-c", "import socket;s=socket.socket();s.bind(('127.0.0.1',0));print(s.getsockname()[1])"]
        ).decode().strip()  # fmt: skip
        cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", port, "launch/pretrain.py",
               "--config", SMOKE, *TINY, f"data.url={data}", f"run_dir={run_dir}", "max_steps=100000",
               "log_every=5", "checkpoint_every=0", "data.num_workers=1", "metrics.enabled=true",
               "metrics.port_base=0", f"metrics.file_sd_dir={targets}"]  # fmt: skip
        log_path = tmp_path / "train.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd,
                cwd=REPO,
                env=launcher_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            # Training has started when both ranks' series are in Prometheus.
            deadline = time.time() + 150  # imports + DeepSpeed start; more if shm_comm compiles
            started = None
            while time.time() < deadline and proc.poll() is None:
                if len(prom.query(f'sslfer_samples_total{{run="{run}"}}')) == 2:
                    started = time.time()
                    break
                time.sleep(0.5)
            assert started, f"Prometheus never saw both ranks:\n{log_path.read_text()[-4000:]}"
            sd = json.loads((targets / f"{run}.json").read_text())
            assert len(sd[0]["targets"]) == 2 and sd[0]["labels"] == {"sslfer_run": run}
            time.sleep(TRAIN_S)
            at = time.time() - 2  # leave the last scrape time to land
            assert proc.poll() is None, log_path.read_text()[-4000:]
            rate_q = f'sum(rate(sslfer_samples_total{{run="{run}"}}[{WINDOW_S}s]))'
            clips_per_s = float(query_at(prom, rate_q, at)[0]["value"][1])
            images_q = f'sum(rate(sslfer_images_total{{run="{run}"}}[{WINDOW_S}s]))'
            images_per_s = float(query_at(prom, images_q, at)[0]["value"][1])
            up = query_at(prom, f'up{{sslfer_run="{run}"}}', at)
            per_rank = query_at(prom, f'sslfer_steps_total{{run="{run}"}}', at)
            gather = query_at(prom, f'sum(sslfer_allgather_seconds_total{{run="{run}"}})', at)
            store = query_at(prom, f'sum(sslfer_store_read_bytes_total{{run="{run}"}})', at)
            loss = query_at(prom, f'sslfer_loss{{run="{run}",term="l2"}}', at)
            wait = query_at(prom, f'sslfer_data_wait_ratio{{run="{run}"}}', at)
            host_peak = query_at(prom, f'sslfer_host_memory_peak_bytes{{run="{run}"}}', at)
        finally:
            stop_run(proc)
        every = log_lines(run_dir)
        idx = [i for i, m in enumerate(every) if at - WINDOW_S + 1 < m["time"] <= at + 0.5 and i > 0]
        assert len(idx) >= 3, every[-5:]
        # The trainer's own figure: each line's images_per_s over its window (images since the previous line /
        # that window's wall time), aggregated over the interval as total images / total time.
        per_step = 2 * 4 * 2  # ranks x [A, NA, P, NP] x data.batch_clips
        images = [(every[i]["step"] - every[i - 1]["step"]) * per_step for i in idx]
        logged = sum(images) / sum(n / every[i]["images_per_s"] for n, i in zip(images, idx))
        plain_mean = sum(every[i]["images_per_s"] for i in idx) / len(idx)
        ratio = images_per_s / logged
        print(
            f"prometheus: {clips_per_s:.2f} clips/s, {images_per_s:.2f} images/s; metrics.jsonl: "
            f"{logged:.2f} images/s over {len(idx)} lines (ratio {ratio:.3f}; plain mean of the lines "
            f"{plain_mean:.2f}, ratio {images_per_s / plain_mean:.3f})"
        )
        assert abs(ratio - 1) < 0.2, (images_per_s, logged)
        assert images_per_s == pytest.approx(4 * clips_per_s, rel=1e-6)  # [A, NA, P, NP]: 4 images per clip
        assert [float(u["value"][1]) for u in up] == [1.0, 1.0]
        assert sorted(r["metric"]["rank"] for r in per_rank) == ["0", "1"]
        assert float(gather[0]["value"][1]) > 0  # the all-gather is timed for real
        assert float(store[0]["value"][1]) > 0  # shard bytes read
        assert loss and float(loss[0]["value"][1]) > 0
        assert len(wait) == 2 and all(0 <= float(w["value"][1]) <= 1 for w in wait)  # a ratio, per rank
        assert len(host_peak) == 2 and all(float(h["value"][1]) > 2**20 for h in host_peak)
    # The run removed its targets when it ended.
    assert not (targets / f"{run}.json").exists()


def test_eval_pushes_progress_and_results_to_pushgateway(tmp_path):
    """``python -m eval --pushgateway URL`` against the real Pushgateway: cells done/total and metric means."""
    import torch
    from prometheus_client.parser import text_string_to_metric_families

    from eval.__main__ import main
    from eval.data import write_toy_frames
    from launch.services import PushgatewayServer
    from pretrain.model import ModelConfig, build_backbone, save_backbone

    data = write_toy_frames(str(tmp_path / "toy-eval"), identities=4, per_identity=10)
    torch.manual_seed(0)
    (tmp_path / "enc").mkdir()
    ckpt = save_backbone(
        build_backbone(ModelConfig(arch="resnet18", width=8)), tmp_path / "enc" / "backbone.pt"
    )
    out = tmp_path / "ev-push"
    with PushgatewayServer(tmp_path / "pgw") as gw:
        argv = ["--checkpoint", str(ckpt), "--data", data, "--tasks", "va,identity", "--out", str(out),
                "--seeds", "2", "--address", "local", "--no-progress", "--pushgateway", gw.url]  # fmt: skip
        assert main(argv) == 0
        text = gw.metrics_text()
    doc = json.loads((out / "results.json").read_text())
    samples = [
        s for f in text_string_to_metric_families(text) for s in f.samples if s.name.startswith("sslfer_eval")
    ]
    for s in samples:
        assert s.labels["job"] == "sslfer_eval" and s.labels["eval_run"] == "ev-push", s
    (name,) = doc["results"]
    for task in ("va", "identity"):
        key = {"checkpoint": name, "task": task, "dataset": "toy-eval"}
        got = {
            s.name: s.value
            for s in samples
            if all(s.labels.get(k) == v for k, v in key.items()) and "metric" not in s.labels
        }
        assert (
            got["sslfer_eval_cells"] == got["sslfer_eval_cells_done"] == 2
            and got["sslfer_eval_cells_failed"] == 0
        )
        for metric, summary in doc["results"][name][task]["toy-eval"]["metrics"].items():
            (pushed,) = [s.value for s in samples if s.name == "sslfer_eval_metric" and s.labels.get("metric") == metric
                         and s.labels["task"] == task]  # fmt: skip
            assert pushed == pytest.approx(summary["mean"]), metric
    assert [s.value for s in samples if s.name == "sslfer_eval_finished"] == [1.0]

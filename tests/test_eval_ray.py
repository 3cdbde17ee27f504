"""The eval fan-out on Ray: in-process cluster, bad input, infeasible requests, and a real head + Jobs API."""

from __future__ import annotations

import io
import json
import os
import urllib.error
import urllib.request

import pytest

from eval.data import write_toy_frames

for _key, _value in {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
}.items():
    os.environ.setdefault(_key, _value)

TASKS = ["expression", "va", "identity"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    import torch

    from pretrain.model import ModelConfig, build_backbone, save_backbone

    root = tmp_path_factory.mktemp("eval-ray")
    data = write_toy_frames(str(root / "toy-eval"), identities=6, per_identity=12)
    ckpts = []
    for seed, name in enumerate(("simclr", "sslfer")):
        torch.manual_seed(seed)
        (root / name).mkdir()
        ckpts.append(
            str(
                save_backbone(
                    build_backbone(ModelConfig(arch="resnet18", width=16)), root / name / "backbone.pt"
                )
            )
        )
    return root, ckpts, data


def _check_cells(out_dir, ckpt_names, dataset, tasks, seeds):
    doc = json.loads((out_dir / "results.json").read_text())
    assert doc["schema_version"] == 1 and doc["seeds"] == list(range(seeds))
    for ckpt in ckpt_names:
        for task in tasks:
            cell = doc["results"][ckpt][task][dataset]
            assert cell["errors"] == [], cell["errors"]
            assert cell["metrics"], (ckpt, task)
            for summary in cell["metrics"].values():
                assert summary["seeds"] == list(range(seeds)) and len(summary["values"]) == seeds
    return doc


def test_fanout_local_writes_every_cell(inputs, local_ray, capsys):
    from eval.__main__ import main

    root, ckpts, data = inputs
    out = root / "out"
    argv = ["--checkpoint", ",".join(ckpts), "--data", data, "--tasks", ",".join(TASKS), "--out", str(out)]
    assert main([*argv, "--seeds", "2", "--address", "local", "--no-progress"]) == 0
    doc = _check_cells(out, ["simclr", "sslfer"], "toy-eval", TASKS, seeds=2)
    assert "confusion" in doc["results"]["simclr"]["expression"]["toy-eval"]
    for name in ("results.md", "config.yaml", "bars_toy-eval.png", "pca_sslfer_toy-eval.png"):
        assert (out / name).is_file(), name
    table = (out / "results.md").read_text()
    assert table.count("| simclr |") == 1 and table.count("| sslfer |") == 1
    assert "expr F1" in capsys.readouterr().out


@pytest.mark.parametrize(
    "change, argument",
    [
        ({"--checkpoint": "missing/backbone.pt"}, "--checkpoint"),
        ({"--data": "/nonexistent/dataset"}, "--data"),
        ({"--tasks": "expression,emotion"}, "--tasks"),
    ],
)
def test_bad_input_names_the_argument(inputs, local_ray, capsys, change, argument):
    from eval.__main__ import main

    root, ckpts, data = inputs
    args = {"--checkpoint": ckpts[0], "--data": data, "--tasks": "expression", "--out": str(root / "bad")}
    args.update(change)
    assert main([x for kv in args.items() for x in kv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and argument in err and len(err.strip().splitlines()) == 1


def test_infeasible_gpu_request_times_out(inputs, local_ray):
    from eval.fanout import EvalConfig, EvalTimeout, RayConfig, run_eval

    _, ckpts, data = inputs
    cfg = EvalConfig(
        checkpoints=ckpts[:1],
        data=[data],
        tasks=["identity"],
        seeds=1,
        ray=RayConfig(gpus_per_task=1, task_timeout_s=3),
    )
    with pytest.raises(EvalTimeout) as err:
        run_eval(cfg, progress=False)
    message = str(err.value)
    assert "waiting for features (requests {'CPU': 0.5, 'GPU': 1})" in message, message
    assert "ray.gpus_per_task" in message and "total {'CPU': 2.0}" in message


@pytest.mark.integration
def test_real_head_runs_eval_job(inputs, tmp_path, monkeypatch):
    """A real `ray start --head` on loopback receives `python -m eval` through the Jobs API."""
    from common.ray_jobs import submit_and_wait
    from launch.ray_head import RayHead
    from launch.services import pid_alive

    root, ckpts, data = inputs
    out = root / "job-out"
    entry = [
        "python",
        "-m",
        "eval",
        "--checkpoint",
        ",".join(ckpts),
        "--data",
        data,
        "--tasks",
        ",".join(TASKS),
    ]
    entry += ["--out", str(out), "--seeds", "1", "--address", "auto", "--no-progress"]
    log = io.StringIO()
    head = RayHead(tmp_path / "head", num_cpus=2)
    with head:
        pid = head.pid
        # token auth by default: without the token the Jobs API refuses, with it the job runs
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{head.dashboard_url}/api/jobs/", timeout=5)
        assert refused.value.code == 401
        assert (head.token_path.stat().st_mode & 0o777) == 0o600
        for key, value in head.client_env().items():
            monkeypatch.setenv(key, value)
        failing = ["python", "-c", "import sys; print('about to fail'); sys.exit(3)"]
        assert (
            submit_and_wait(head.dashboard_url, failing, working_dir=None, timeout_s=60, poll_s=0.5, out=log)
            == 1
        )
        assert "about to fail" in log.getvalue() and "FAILED" in log.getvalue()
        code = submit_and_wait(
            head.dashboard_url,
            entry,
            working_dir=".",
            timeout_s=120,
            poll_s=0.5,
            out=log,
            copy_results=str(tmp_path / "copied"),
        )
    assert code == 0, log.getvalue()[-3000:]
    assert "SUCCEEDED" in log.getvalue()
    _check_cells(out, ["simclr", "sslfer"], "toy-eval", TASKS, seeds=1)
    assert (tmp_path / "copied" / "results.json").is_file()
    with open(f"/proc/{pid}/stat") if pid_alive(pid) else io.StringIO("x x Z") as stat:
        assert stat.read().split()[2] == "Z"  # gone (or an unreaped zombie)


def test_submit_address_follows_ray_conventions(monkeypatch):
    from common.ray_jobs import default_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_DASHBOARD_URL", raising=False)
    assert default_address() == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_DASHBOARD_URL", "http://10.0.0.5:8265")
    assert default_address() == "http://10.0.0.5:8265"
    monkeypatch.setenv(
        "RAY_ADDRESS", "http://10.0.0.9:8265"
    )  # Ray's own variable wins, as in `ray job submit`
    assert default_address() == "http://10.0.0.9:8265"

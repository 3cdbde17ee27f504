"""DeepSpeed's own conventions on the command line: ``--deepspeed --deepspeed_config ds.json``.

The user's JSON is merged into the DeepSpeed config the project derives from its config: it may add anything
(monitors, profilers, logging), a derived key with another value is one clear error naming the JSON key and the
config key to change. A real 2-rank ``deepspeed`` launch with ``csv_monitor`` shows the loss per step in
DeepSpeed's CSV files and saves the resolved config as RUN_DIR/ds_config.json.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.configio import load_config
from common.errors import ConfigError
from pretrain.distributed import free_port
from pretrain.ds_config import build_ds_config, merge_user_config, save_resolved
from tests.helpers import TINY_OVERRIDES, launcher_env, write_synth_clips

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SMOKE = "launch/configs/smoke.yaml"


def _cfg(*overrides: str):
    from pretrain.config import PretrainConfig

    return load_config(PretrainConfig, REPO / SMOKE, list(overrides))


# ---------------------------------------------------------------------------------------------- unit tests


def test_user_json_adds_keys_and_may_repeat_or_auto_the_derived_ones():
    cfg = _cfg("data.batch_clips=4", "optim.lr=1e-3")
    project = build_ds_config(cfg, world_size=2)
    user = {
        "csv_monitor": {"enabled": True, "output_path": "/tmp/x", "job_name": "j"},
        "tensorboard": {"enabled": False},
        "comms_logger": {"enabled": True, "verbose": False},
        "flops_profiler": {"enabled": True, "profile_step": 2},
        "wall_clock_breakdown": True,  # a project default, not derived: the user's value wins
        "steps_per_print": 5,
        "train_micro_batch_size_per_gpu": 4,  # the same value: fine
        "train_batch_size": "auto",  # HF-style: take the project's value
        "optimizer": {"params": {"lr": 0.001}},  # 1e-3: the same number
        "zero_optimization": {"stage": 0, "overlap_comm": True},  # stage agrees; ZeRO tuning is the user's
    }
    merged = merge_user_config(project, user, cfg, 2, "ds.json")
    assert merged["csv_monitor"] == user["csv_monitor"] and merged["comms_logger"]["enabled"] is True
    assert merged["flops_profiler"]["profile_step"] == 2
    assert merged["wall_clock_breakdown"] is True and merged["steps_per_print"] == 5
    assert merged["train_batch_size"] == 8 and merged["train_micro_batch_size_per_gpu"] == 4
    assert merged["zero_optimization"] == {"stage": 0, "overlap_comm": True}
    # The project's optimizer params survive next to the user's repeated lr.
    assert merged["optimizer"]["type"] == "Adam" and merged["optimizer"]["params"]["torch_adam"] is True
    assert merged["optimizer"]["params"]["betas"] == [0.9, 0.999]
    assert user["train_batch_size"] == "auto"  # the caller's dict is not modified
    assert merge_user_config(project, {}, cfg, 2) == project


@pytest.mark.parametrize(
    "user,json_key,config_key",
    [
        ({"train_micro_batch_size_per_gpu": 8}, "train_micro_batch_size_per_gpu", "data.batch_clips=8"),
        ({"train_batch_size": 32}, "train_batch_size", "data.global_batch_clips=32"),
        ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps", "data.global_batch_clips"),
        ({"optimizer": {"params": {"lr": 0.1}}}, "optimizer.params.lr", "optim.lr=0.1"),
        ({"optimizer": {"type": "AdamW"}}, "optimizer.type", "optim.decoupled_weight_decay"),
        ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage", "zero_stage=2"),
        ({"bf16": {"enabled": True}}, "bf16.enabled", "precision=bf16_weights"),
        ({"fp16": {"enabled": True}}, "fp16.enabled", "precision=bf16_autocast"),
        ({"gradient_clipping": 1.0}, "gradient_clipping", "optim.grad_clip=1.0"),
        ({"scheduler": {"type": "WarmupLR"}}, "scheduler", "optim.warmup_steps"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_a_conflicting_derived_key_is_one_error_naming_both_keys(user, json_key, config_key):
    cfg = _cfg("data.batch_clips=4")
    with pytest.raises(ConfigError) as err:
        merge_user_config(build_ds_config(cfg, 2), user, cfg, 2, "ds.json")
    text = str(err.value)
    assert text.startswith("--deepspeed_config ds.json: a key conflicts"), text
    assert f"'{json_key}'" in text and config_key in text, text


def test_several_conflicts_are_still_one_error():
    cfg = _cfg("data.batch_clips=4")
    user = {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 1}, "csv_monitor": {}}
    with pytest.raises(ConfigError, match="2 keys conflict") as err:
        merge_user_config(build_ds_config(cfg, 2), user, cfg, 2, "ds.json")
    assert "'data.batch_clips'" in str(err.value) and "'zero_stage'" in str(err.value)


def test_resolved_config_is_saved_without_secrets(tmp_path):
    path = save_resolved(
        {"comet": {"enabled": True, "api_key": "s3cr3t", "project": "p"}}, tmp_path / "ds.json"
    )
    saved = json.loads(path.read_text())
    assert saved == {"comet": {"enabled": True, "api_key": "***", "project": "p"}}


def test_deepspeed_arguments_mix_with_overrides():
    from launch.pretrain import parse_args

    args = parse_args(["--config", "c.yaml", "a=1", "--deepspeed", "--deepspeed_config", "ds.json", "b=2",
                       "--local_rank=1"])  # fmt: skip
    assert (args.config, args.overrides, args.deepspeed, args.deepspeed_config) == (
        "c.yaml",
        ["a=1", "b=2"],
        True,
        "ds.json",
    )
    assert parse_args(["--config", "c.yaml"]).deepspeed_config is None
    assert parse_args(["--deepscale_config", "old.json"]).deepspeed_config == "old.json"  # deprecated alias


def _run_cli(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "launch/pretrain.py", *args],
        cwd=REPO,
        env=launcher_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_conflict_is_one_clear_error_before_training(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "csv_monitor": {"enabled": True}}))
    run_dir = tmp_path / "run"
    proc = _run_cli(["--deepspeed", "--deepspeed_config", str(ds), "--config", SMOKE, *TINY_OVERRIDES,
                     "data.url=/nonexistent/data", f"run_dir={run_dir}"])  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "'train_micro_batch_size_per_gpu'" in lines[0] and "'data.batch_clips'" in lines[0]
    assert "data.batch_clips=8" in lines[0] and str(ds) in lines[0]
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists()  # nothing started: the data were never opened


def test_cli_unreadable_json_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for path, words in ((bad, "not valid JSON"), (tmp_path / "none.json", "cannot read")):
        proc = _run_cli(["--config", SMOKE, "--deepspeed", "--deepspeed_config", str(path)])
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert proc.returncode == 2 and len(lines) == 1 and words in lines[0], proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------- real launch


def _csv(path: Path) -> list[tuple[int, float]]:
    with open(path) as f:
        rows = list(csv.reader(f))
    assert rows and rows[0][0] == "step", rows[:2]
    return [(int(step), float(value)) for step, value in rows[1:]]


@pytest.mark.integration
def test_deepspeed_launch_with_csv_monitor_records_the_loss_per_step(tmp_path):
    data = write_synth_clips(tmp_path / "clips")
    run_dir = tmp_path / "run"
    monitor_dir = tmp_path / "monitor"
    ds = tmp_path / "ds.json"
    ds.write_text(
        json.dumps(
            {
                "csv_monitor": {"enabled": True, "output_path": str(monitor_dir), "job_name": "sslfer"},
                "train_micro_batch_size_per_gpu": 2,  # repeats data.batch_clips: allowed
                "steps_per_print": 1000,
            }
        )
    )
    steps = 3
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "launch/pretrain.py", "--deepspeed", "--deepspeed_config", str(ds), "--config", SMOKE,
           *TINY_OVERRIDES, f"data.url={data}", f"run_dir={run_dir}", f"max_steps={steps}", "log_every=1",
           "checkpoint_every=0"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=launcher_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]

    resolved = json.loads((run_dir / "ds_config.json").read_text())
    assert (run_dir / "config.yaml").exists()
    assert resolved["csv_monitor"]["enabled"] is True and resolved["steps_per_print"] == 1000
    assert resolved["train_batch_size"] == 4 and resolved["optimizer"]["params"]["torch_adam"] is True

    files = sorted(p.name for p in (monitor_dir / "sslfer").iterdir())
    assert "Train_Samples_train_loss.csv" in files and "Train_Samples_lr.csv" in files, files
    loss = _csv(monitor_dir / "sslfer" / "Train_Samples_train_loss.csv")
    lr = _csv(monitor_dir / "sslfer" / "Train_Samples_lr.csv")
    # One row per optimiser step, on DeepSpeed's samples axis (train_batch_size = 2 clips x 2 ranks).
    assert [s for s, _ in loss] == [4 * (i + 1) for i in range(steps)] == [s for s, _ in lr]
    logged = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [v for _, v in loss] == pytest.approx(logged, rel=1e-5)  # the mean over ranks, as metrics.jsonl

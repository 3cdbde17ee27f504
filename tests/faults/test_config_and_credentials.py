"""Refused before training: bad configs (exit 2, one line naming the key, no traceback) and missing or wrong
S3 credentials (a clear message; the secret never printed or written)."""

from __future__ import annotations

import pytest

from tests.faults.conftest import SMOKE, TINY, assert_clean_error, record, run

pytestmark = pytest.mark.faults

BAD_CONFIGS = [
    (["optim.nope=1"], "optim.nope"),  # unknown key
    (["data.batch_clips=two"], "data.batch_clips"),  # wrong type
    (["max_steps=1.5"], "max_steps"),  # wrong type (float for int)
    (["loss.temperature=0"], "loss.temperature"),
    (["loss.temperature=-0.07"], "loss.temperature"),
    (["data.batch_clips=1"], "data.batch_clips"),  # no per-rank batch can hold negatives
    (
        ["sampling.positive_offsets_s=[30.0]"],
        "sampling.positive_offsets_s",
    ),  # longer than any clip (manifest)
    (
        ["descriptors.kind=cnn", "descriptors.weights_path=/nonexistent/resnet18.pt"],
        "descriptors.weights_path",
    ),
    (["dist_timeout_s=0"], "dist_timeout_s"),
    (["nan_policy=ignore"], "nan_policy"),
    (["store.retries=-1"], "store.retries"),
]


@pytest.mark.parametrize("overrides,key", BAD_CONFIGS, ids=[k for _, k in BAD_CONFIGS])
def test_bad_config_one_clear_error(overrides, key, clips_dir, tmp_path, capsys):
    from launch.pretrain import main

    run_dir = tmp_path / "run"
    code = main(["--config", SMOKE, *TINY, f"data.url={clips_dir}", f"run_dir={run_dir}", *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and f"'{key}'" in lines[0], err
    assert "Traceback" not in err
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()
    record(f"bad config {key}", exit_code=code)


@pytest.fixture(scope="module")
def s3_clips(object_store, clips_dir) -> str:
    client = object_store._client()
    files = sorted(p for p in clips_dir.iterdir() if p.name != "manifest.json")
    for path in [*files, clips_dir / "manifest.json"]:
        client.upload_file(str(path), object_store.bucket, f"faults-creds/{path.name}")
    return object_store.url("faults-creds")


@pytest.mark.integration
@pytest.mark.parametrize("case", ["missing", "wrong"])
def test_credentials_fail_before_training_and_never_leak(case, object_store, s3_clips, tmp_path):
    run_dir = tmp_path / "run"
    wrong_secret = "WRONGsecret" + object_store.secret_key[::-1]
    store_env = object_store.env()
    if case == "missing":
        store_env.update(AWS_ACCESS_KEY_ID="", AWS_SECRET_ACCESS_KEY="")
        needle = "no S3 credentials"
    else:
        store_env.update(AWS_SECRET_ACCESS_KEY=wrong_secret)
        needle = "rejected the credentials"
    args = [f"data.url={s3_clips}", f"run_dir={run_dir}", "max_steps=2", "store.retries=1"]
    rc, out = run("python", args, timeout=120, **store_env)
    line = assert_clean_error(rc, out, needle, "AWS_SECRET_ACCESS_KEY")
    assert (
        "deepspeed" not in out.lower() or "initialize" not in out.lower()
    )  # failed before the model was built
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()
    for secret in (object_store.secret_key, wrong_secret):
        assert secret not in out
        for path in run_dir.rglob("*") if run_dir.exists() else []:
            assert not path.is_file() or secret.encode() not in path.read_bytes(), path
    record(f"credentials {case}", exit_code=rc, message=line[:60] + "...")

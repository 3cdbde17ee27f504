"""The local object store: loopback only, credentials required, started and stopped by PID."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from launch.services import ObjectStore, pid_alive

pytestmark = pytest.mark.integration


def test_cli_start_env_status_stop(tmp_path):
    store_dir = tmp_path / "store"
    run = [sys.executable, "-m", "launch.services", "store"]
    started = subprocess.run(
        [*run, "start", "--dir", str(store_dir), "--port", "0"], capture_output=True, text=True, timeout=90
    )
    assert started.returncode == 0, started.stderr
    exports = dict(
        line.removeprefix("export ").split("=", 1)
        for line in started.stdout.splitlines()
        if line.startswith("export")
    )
    assert exports["AWS_ENDPOINT_URL_S3"].startswith("http://127.0.0.1:")
    pid = int((store_dir / "weed.pid").read_text())
    try:
        assert pid_alive(pid)
        status = subprocess.run([*run, "status", "--dir", str(store_dir)], capture_output=True, text=True)
        assert status.returncode == 0 and "running" in status.stdout
        # Every listening socket of the server is on loopback.
        listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
        weed_lines = [line for line in listening.splitlines() if f"pid={pid}," in line]
        assert weed_lines, listening
        assert all("127.0.0.1:" in line.split()[3] for line in weed_lines), weed_lines
    finally:
        stopped = subprocess.run(
            [*run, "stop", "--dir", str(store_dir)], capture_output=True, text=True, timeout=60
        )
    assert stopped.returncode == 0
    assert not pid_alive(pid)


def test_unsigned_and_wrongly_signed_requests_are_refused(tmp_path):
    import boto3
    from botocore.exceptions import ClientError

    with ObjectStore(data_dir=tmp_path / "s") as store:
        # Unsigned HTTP request: refused.
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{store.endpoint}/{store.bucket}/", timeout=5)
        assert err.value.code == 403
        # Signed with a wrong secret: refused.
        bad = boto3.client(
            "s3",
            endpoint_url=store.endpoint,
            aws_access_key_id=store.access_key,
            aws_secret_access_key="wrong-secret",
            region_name="us-east-1",
        )
        with pytest.raises(ClientError) as err2:
            bad.list_objects_v2(Bucket=store.bucket)
        assert err2.value.response["Error"]["Code"] in (
            "SignatureDoesNotMatch",
            "AccessDenied",
            "InvalidAccessKeyId",
        )
        # Right keys: allowed.
        good = store._client()
        good.put_object(Bucket=store.bucket, Key="k", Body=b"v")
        assert good.get_object(Bucket=store.bucket, Key="k")["Body"].read() == b"v"
        pid = store.pid
    assert not pid_alive(pid)
    assert not os.path.exists(tmp_path / "s" / "weed.pid")

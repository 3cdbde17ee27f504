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


def test_filer_and_volume_ports_refuse_requests_without_a_token(tmp_path):
    """Only the S3 port was authenticated once: the filer served GET, POST (overwrite) and DELETE to anyone."""
    with ObjectStore(data_dir=tmp_path / "s") as store:
        client = store._client()
        client.put_object(Bucket=store.bucket, Key="d/manifest.json", Body=b'{"ok": 1}')
        path = f"/buckets/{store.bucket}/d/manifest.json"
        for method, port, data in (
            ("GET", store.filer_port, None),
            ("POST", store.filer_port, b"overwritten"),
            ("PUT", store.filer_port, b"overwritten"),
            ("DELETE", store.filer_port, None),
            ("GET", store.filer_port, b""),
        ):
            url = f"http://127.0.0.1:{port}{path if data != b'' else '/'}"
            request = urllib.request.Request(url, data=data or None, method=method)
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(request, timeout=5)
            assert err.value.code == 401, (method, url)
        assert client.get_object(Bucket=store.bucket, Key="d/manifest.json")["Body"].read() == b'{"ok": 1}'
        # Secrets and data are private to their owner.
        assert (tmp_path / "s").stat().st_mode & 0o777 == 0o700
        assert (tmp_path / "s" / "data").stat().st_mode & 0o777 == 0o700
        for name in ("store.json", "security.toml"):
            assert (tmp_path / "s" / name).stat().st_mode & 0o777 == 0o600, name


def test_exports_are_quoted_so_eval_runs_no_embedded_command(tmp_path):
    from launch.services import export_lines

    marker = tmp_path / "pwned"
    secret = f"abc$(touch {marker})`touch {marker}`;touch {marker} 'q\"x"
    script = export_lines({"AWS_SECRET_ACCESS_KEY": secret}) + 'printf %s "$AWS_SECRET_ACCESS_KEY"'
    shown = subprocess.run(["bash", "-c", 'eval "$(cat)"'], input=script, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == secret
    assert not marker.exists()


def test_secret_key_is_not_accepted_in_argv(tmp_path):
    run = [sys.executable, "-m", "launch.services", "store", "start", "--dir", str(tmp_path / "s")]
    refused = subprocess.run([*run, "--secret-key", "s3cret"], capture_output=True, text=True, timeout=30)
    assert refused.returncode == 2 and "unrecognized arguments: --secret-key" in refused.stderr


def test_stop_leaves_alone_a_process_that_reused_the_recorded_pid(tmp_path):
    """``store stop`` after the store died and its PID went to another process must not kill that one."""
    import json

    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        state = tmp_path / "s"
        state.mkdir()
        record = {"pid": bystander.pid, "pid_start": "1", "bucket": "b", "AWS_ENDPOINT_URL_S3": "http://x"}
        (state / "store.json").write_text(json.dumps(record))
        run = [sys.executable, "-m", "launch.services", "store"]
        status = subprocess.run([*run, "status", "--dir", str(state)], capture_output=True, text=True)
        assert status.returncode == 1 and "not running" in status.stdout
        stopped = subprocess.run(
            [*run, "stop", "--dir", str(state)], capture_output=True, text=True, timeout=30
        )
        assert stopped.returncode == 0 and "left alone" in stopped.stdout
        assert bystander.poll() is None and pid_alive(bystander.pid)
    finally:
        bystander.kill()
        bystander.wait()


def test_prometheus_has_no_lifecycle_api(tmp_path):
    import shutil

    from launch.services import PrometheusServer

    if not shutil.which("prometheus"):
        pytest.fail("prometheus is not installed: run `make setup` as root")
    with PrometheusServer(data_dir=tmp_path / "prom") as prom:
        request = urllib.request.Request(f"{prom.url}/-/quit", data=b"", method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=5)
        assert err.value.code == 403
        with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=5) as resp:
            assert resp.status == 200


@pytest.fixture
def taken_port():
    """A loopback port held (listening) by this test."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_port_taken_before_weed_binds_it_means_fresh_ports_not_a_failed_start(
    tmp_path, taken_port, monkeypatch
):
    """free_port cannot reserve a port: another process may take it before weed binds. weed then exits
    naming the port, and the store starts again on fresh ones (here the first volume port is taken)."""
    import launch.services as services

    real, calls = services.free_port, []

    def first_volume_port_taken(*args, **kwargs):
        calls.append(None)
        return taken_port if len(calls) == 3 else real(*args, **kwargs)  # S3, master, volume, ...

    monkeypatch.setattr(services, "free_port", first_volume_port_taken)
    with ObjectStore(data_dir=tmp_path / "store") as store:
        assert store.volume_port != taken_port and pid_alive(store.pid)
        assert store._client().head_bucket(Bucket=store.bucket)["ResponseMetadata"]["HTTPStatusCode"] == 200
    failures = [
        line for line in (tmp_path / "store/weed.log").read_text().splitlines() if str(taken_port) in line
    ]
    assert len(failures) == 1 and "not available" in failures[0], failures


def test_a_taken_s3_port_the_user_chose_is_one_clear_error_before_weed_starts(tmp_path, taken_port):
    from launch.services import ServiceError

    with pytest.raises(ServiceError, match=f"port {taken_port} on 127.0.0.1 is in use.*--port"):
        ObjectStore(data_dir=tmp_path / "store", port=taken_port).start()
    assert not (tmp_path / "store/weed.log").exists()  # refused before weed was started
    assert not (tmp_path / "store/weed.pid").exists()

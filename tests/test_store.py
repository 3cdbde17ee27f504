"""data_shards.store against local folders and the real SeaweedFS store (launch.services.ObjectStore)."""

from __future__ import annotations

import io
import logging
import socket
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from data_shards import store
from data_shards.store import StoreConfig, StoreError


@pytest.fixture(autouse=True)
def fast_retries():
    """Few, short retries so failure tests finish quickly; restore the default policy afterwards."""
    store.configure(StoreConfig(retries=1, backoff_s=0.01, connect_timeout_s=1.0))
    yield
    store.configure(StoreConfig())


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed when the socket is: nothing listens there


def test_local_put_read_list_exists(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload")
    dest = store.join(str(tmp_path / "out" / "deep"), "a.bin")
    store.put_file(src, dest)
    assert store.read_bytes(dest) == b"payload"
    assert store.exists(dest) and not store.exists(dest + ".missing")
    assert store.list_dir(str(tmp_path / "out" / "deep")) == ["a.bin"]
    assert not [p for p in (tmp_path / "out" / "deep").iterdir() if p.name.endswith(".partial")]
    before = store.bytes_read()
    with store.open_url(dest) as f:
        assert f.read() == b"payload"
    assert store.bytes_read() - before == len(b"payload")


def test_unwritable_local_destination_is_a_store_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="writable"):
        store.check_access(str(blocker / "dataset"), write=True)


def test_s3_roundtrip_on_real_store(s3_env, tmp_path):
    url = s3_env.url("test-store/roundtrip")
    store.check_access(url, write=True)
    local = tmp_path / "blob.bin"
    local.write_bytes(bytes(range(256)) * 100)
    store.put_file(local, store.join(url, "blob.bin"))
    store.put_bytes(b"{}", store.join(url, "small.json"))
    assert store.read_bytes(store.join(url, "blob.bin")) == local.read_bytes()
    assert store.exists(store.join(url, "small.json"))
    assert not store.exists(store.join(url, "nothing.json"))
    assert store.list_dir(url) == ["blob.bin", "small.json"]
    with pytest.raises(FileNotFoundError):
        store.read_bytes(store.join(url, "nothing.json"))


def test_wrong_secret_key_is_a_credentials_error(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "0" * 32)
    url = s3_env.url("test-store/denied")
    with pytest.raises(StoreError, match="rejected the credentials") as err:
        store.check_access(url, write=True)
    assert "AWS_SECRET_ACCESS_KEY" in str(err.value)
    with pytest.raises(StoreError, match="credentials"):
        store.read_bytes(store.join(url, "x.json"))
    with pytest.raises(StoreError, match="credentials"):
        store.list_dir(url)


def test_wrong_access_key_is_a_credentials_error(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    with pytest.raises(StoreError, match="AWS_ACCESS_KEY_ID=nobody"):
        store.put_bytes(b"x", s3_env.url("test-store/denied/x"))


def test_missing_credentials(s3_env, monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StoreError, match="no S3 credentials.*AWS_ACCESS_KEY_ID"):
        store.check_access(s3_env.url("x"))


def test_missing_bucket(s3_env):
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist"):
        store.check_access("s3://no-such-bucket/prefix")


def test_unreachable_endpoint_fails_fast_and_names_the_setting(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{closed_port()}")
    start = time.monotonic()
    with pytest.raises(StoreError, match="AWS_ENDPOINT_URL_S3") as err:
        store.read_bytes("s3://sslfer/any/manifest.json")
    assert time.monotonic() - start < 5
    assert "cannot reach" in str(err.value)


def test_transient_errors_are_retried_with_a_bound():
    store.configure(StoreConfig(retries=2, backoff_s=0.001))
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "ok"

    assert store._with_retries(flaky, "s3://b/x") == "ok"
    calls.clear()

    def always_down():
        calls.append(1)
        raise ConnectionResetError("reset by peer")

    with pytest.raises(ConnectionResetError):
        store._with_retries(always_down, "s3://b/x")
    assert len(calls) == 3  # first try + 2 retries


def _fake_env(monkeypatch, url: str) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "fake-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-secret")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


def test_s3_requests_use_botocore_standard_retries(monkeypatch):
    """store.retries becomes botocore's standard-mode attempts; s3fs's own (unjittered) retry loop is off."""
    _fake_env(monkeypatch, f"http://127.0.0.1:{closed_port()}")
    store.configure(StoreConfig(retries=6))
    fs = store._filesystem()
    assert fs.s3.meta.config.retries == {"mode": "standard", "total_max_attempts": 7}
    assert fs.retries == 1


def test_unreachable_endpoint_is_retried_by_botocore_only(monkeypatch, caplog):
    """Refused connections: botocore retries each request store.retries times (logged), no second layer on top."""
    _fake_env(monkeypatch, f"http://127.0.0.1:{closed_port()}")
    store.configure(StoreConfig(retries=3, backoff_s=0.01, backoff_max_s=0.02))
    with caplog.at_level(logging.WARNING, logger="data_shards.store"):
        with pytest.raises(StoreError, match="cannot reach the S3 endpoint"):
            store.read_bytes("s3://bucket/prefix/manifest.json")
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 3, retries
    assert all("EndpointConnectionError" in m and "/bucket/prefix/manifest.json" in m for m in retries), (
        retries
    )
    assert [m.split("retry ")[1].split(" ")[0] for m in retries] == ["1/3", "2/3", "3/3"]


class _FlakyS3(BaseHTTPRequestHandler):
    """A store that answers HEAD with 503 (Service Unavailable) ``failures`` times, then 200."""

    failures = 2
    seen: list[str] = []

    def do_HEAD(self):  # noqa: N802 - http.server's name
        type(self).seen.append(self.path)
        status = 503 if len(type(self).seen) <= type(self).failures else 200
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_5xx_is_retried_by_botocore_with_jittered_waits(monkeypatch, caplog):
    _FlakyS3.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FlakyS3)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        _fake_env(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}")
        store.configure(StoreConfig(retries=4, backoff_s=0.01, backoff_max_s=0.05))
        with caplog.at_level(logging.WARNING, logger="data_shards.store"):
            store.check_access("s3://bucket/prefix")  # HEAD bucket: 503, 503, 200
    finally:
        server.shutdown()
        server.server_close()
    assert len(_FlakyS3.seen) == 3
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 2 and all("HTTP 503" in m and "HeadBucket" in m for m in retries), retries


def test_backoff_is_full_jitter_under_the_store_caps(monkeypatch):
    cfg = StoreConfig(backoff_s=0.25, backoff_max_s=1.0)

    class Top:
        def uniform(self, low, high):
            return high

    monkeypatch.setattr(store, "_JITTER", Top())
    assert [store.backoff_delay(a, cfg) for a in range(5)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    monkeypatch.undo()
    waits = [store.backoff_delay(3, cfg) for _ in range(200)]
    assert all(0 <= w <= 1.0 for w in waits)
    assert min(waits) < 0.2 and max(waits) > 0.8  # spread over [0, cap]: ranks do not retry in lockstep


def test_botocore_errors_are_final_body_errors_are_retried():
    from botocore.exceptions import EndpointConnectionError, ResponseStreamingError

    store.configure(StoreConfig(retries=2, backoff_s=0.001))
    calls = []

    def refused():
        calls.append(1)
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")

    with pytest.raises(StoreError, match="cannot reach"):
        store._with_retries(refused, "s3://b/x")
    assert len(calls) == 1  # botocore already spent the retries on this request

    calls.clear()

    def cut_body():
        calls.append(1)
        if len(calls) < 3:
            raise ResponseStreamingError(error=ConnectionResetError("reset mid-body"))
        return b"ok"

    assert store._with_retries(cut_body, "s3://b/x") == b"ok" and len(calls) == 3


def test_an_open_object_retries_a_read_cut_mid_body():
    from botocore.exceptions import ResponseStreamingError

    store.configure(StoreConfig(retries=2, backoff_s=0.001))

    class Raw:
        fails = 1

        def read(self, size=-1):
            if self.fails:
                self.fails -= 1
                raise ResponseStreamingError(error=ConnectionResetError("reset"))
            return b"abc"

    before = store.bytes_read()
    assert store._CountingReader(Raw(), "s3://b/x").read(3) == b"abc"
    assert store.bytes_read() - before == 3
    with pytest.raises(ResponseStreamingError):  # a local file's reader never retries
        store._CountingReader(Raw(), None).read(3)


def test_webdataset_streams_a_shard_from_the_real_store(s3_env, tmp_path):
    import webdataset as wds

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for i in range(3):
            for ext, data in (("txt", f"sample {i}".encode()), ("cls", str(i).encode())):
                info = tarfile.TarInfo(f"k{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    url = s3_env.url("test-store/wds/shard-000000.tar")
    store.put_bytes(buffer.getvalue(), url)
    store.register_webdataset_s3()
    before = store.bytes_read()
    samples = list(wds.WebDataset(url, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == ["k0", "k1", "k2"]
    assert samples[2]["txt"] == b"sample 2"
    assert store.bytes_read() - before >= len(buffer.getvalue())

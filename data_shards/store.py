"""One door to storage: local paths and ``s3://bucket/prefix`` URLs (s3fs).

Endpoint and keys come from the standard AWS environment variables (``AWS_ENDPOINT_URL_S3``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``), so the same code talks to the
local SeaweedFS store and to a cloud bucket. Every failure a user can fix becomes a :class:`StoreError`
whose message names the URL or setting and the fix.

Retries (``store`` config section, :class:`StoreConfig`) happen in one place per kind of failure, always with
full jitter (a random wait in [0, cap]), so ranks that lost the store together do not come back in lockstep:

* Every S3 request: botocore's ``standard`` retry mode (``retries: {"mode": "standard", "total_max_attempts":
  1 + store.retries}`` in s3fs's ``config_kwargs``): refused/reset connections, timeouts, 5xx and throttling are
  retried by botocore, under its retry quota (a circuit breaker that stops retrying a store that keeps failing).
  Its backoff is botocore's exponential full jitter with the project's first cap and ceiling: wait n is
  ``U(0, 1) * min(store.backoff_s * 2**(n-1), store.backoff_max_s)`` (botocore's own constants, 1 s and 20 s, are
  not settable through ``Config``). Each retry is logged as a warning (``retry n/N``).
* s3fs's own retry loop (no jitter) is off (``fs.retries = 1``): it would repeat what botocore already retried.
* Failures botocore never sees, those while a response body is read (a connection dropped mid-object, a body
  read timeout), are retried by this module around the whole call (:func:`_with_retries`) or the read
  (:class:`_CountingReader`), with the same budget and full jitter (:func:`backoff_delay`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from common.errors import ConfigError, UserError

T = TypeVar("T")
log = logging.getLogger(__name__)

ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
CREDENTIALS_HINT = (
    "export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for this store "
    "(for the local store: eval $(python -m launch.services store env --dir DIR))"
)


class StoreError(UserError, RuntimeError):
    """Storage is misconfigured or unreachable; the message names the URL/setting and the fix."""


@dataclass
class StoreConfig:
    """Retry and timeout policy for object-store calls."""

    retries: int = 4  # extra attempts after the first, for transient errors only (botocore standard mode)
    backoff_s: float = 0.25  # first wait's cap (full jitter: random in [0, cap]); doubles per retry
    backoff_max_s: float = 8.0  # largest cap of a wait between retries (each wait random up to it)
    connect_timeout_s: float = 5.0  # object-store connect timeout
    read_timeout_s: float = 60.0  # object-store read timeout
    block_size: int = 16 * 2**20  # s3fs read/write block: 16 MiB read ahead streams ~20% faster than 8

    def validate(self) -> None:

        if self.retries < 0:
            raise ConfigError(f"config key 'store.retries': must be >= 0, got {self.retries}")
        if self.backoff_s < 0 or self.backoff_max_s < 0:
            raise ConfigError("config key 'store.backoff_s': must be >= 0")


_config = StoreConfig()


def configure(config: StoreConfig) -> None:
    """Set the process-wide retry/timeout policy (e.g. few retries in tests)."""
    global _config
    config.validate()
    _config = config
    _filesystems.clear()


def get_config() -> StoreConfig:
    return _config


# Jitter from the OS, not the `random` module's global state: training seeds that identically on every rank,
# which would bring the ranks back in lockstep after an outage.
_JITTER = random.SystemRandom()


def backoff_delay(attempt: int, config: StoreConfig | None = None) -> float:
    """Full-jitter wait before retry ``attempt + 1`` (0-based): ``U(0, min(backoff_s * 2**attempt, backoff_max_s))``.

    The schedule of every retry in the project's store access: botocore's retries of S3 requests and the retries
    of body reads here; callers with a retry loop of their own (re-opening a shard) should use it too.
    """
    config = config or _config
    return _JITTER.uniform(0.0, min(config.backoff_s * 2.0**attempt, config.backoff_max_s))


# ---------------------------------------------------------------- bytes-read counter (exported as a metric)


class _ByteCounter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._total = 0

    def add(self, n: int) -> None:
        with self._lock:
            self._total += n

    @property
    def total(self) -> int:
        return self._total


BYTES_READ = _ByteCounter()


def bytes_read() -> int:
    """Bytes read through this module since the process started (all URLs)."""
    return BYTES_READ.total


class _CountingReader:
    """Proxy for a binary file that adds every byte read to :data:`BYTES_READ`.

    With ``url`` (an ``s3://`` object), a read that fails while a response body streams in (botocore never sees
    those, so it did not retry them) is retried here: s3fs fetches ranges lazily and a failed fetch leaves the
    file position where it was.
    """

    def __init__(self, raw: IO[bytes], url: str | None = None) -> None:
        self._raw = raw
        self._url = url

    def _retrying(self, fn: Callable[[], T]) -> T:
        if self._url is None:
            return fn()
        return _with_retries(fn, self._url, body_only=True)

    def read(self, size: int = -1) -> bytes:
        data = self._retrying(lambda: self._raw.read(size))
        BYTES_READ.add(len(data))
        return data

    def readinto(self, buffer) -> int:
        n = self._retrying(lambda: self._raw.readinto(buffer))
        BYTES_READ.add(n or 0)
        return n

    def close(self) -> None:
        self._raw.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)

    def __enter__(self) -> _CountingReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- URLs


def is_s3(url: str) -> bool:
    return str(url).startswith("s3://")


def _s3_path(url: str) -> str:
    """``s3://bucket/key`` -> ``bucket/key`` (what s3fs expects)."""
    return str(url)[len("s3://") :].rstrip("/")


def _bucket(url: str) -> str:
    return _s3_path(url).split("/", 1)[0]


def join(url: str, name: str) -> str:
    """Child ``name`` of the folder/prefix ``url``."""
    url = str(url)
    if is_s3(url):
        return url.rstrip("/") + "/" + name.lstrip("/")
    return os.path.join(url, name)


def basename(url: str) -> str:
    return str(url).rstrip("/").rsplit("/", 1)[-1]


# ---------------------------------------------------------------- s3fs filesystem (one per env + pid)

_filesystems: dict[tuple, Any] = {}
_fs_lock = threading.Lock()


def endpoint() -> str | None:
    for var in ENDPOINT_VARS:
        if os.environ.get(var):
            return os.environ[var]
    return None


class _StandardRetries:
    """botocore's ``standard`` retry handler (retry conditions, retry quota) with the ``store`` backoff, logged.

    Registered on the session under botocore's own handler id (``retry-config-s3``), so the client that s3fs
    creates with ``retries: {"mode": "standard"}`` keeps this one instead of building its own: botocore's
    ``Config`` sets the mode and the attempts but not the backoff's first cap and ceiling.
    """

    def __init__(self, config: StoreConfig):
        from aiobotocore.retries.standard import AioRetryHandler, AioRetryPolicy, AioStandardRetryConditions
        from botocore.retries import quota
        from botocore.retries.base import BaseRetryBackoff
        from botocore.retries.standard import RetryEventAdapter, RetryQuotaChecker

        class Backoff(BaseRetryBackoff):
            def delay_amount(self, context) -> float:
                return backoff_delay(context.attempt_number - 1, config)

        self.config = config
        self.quota = RetryQuotaChecker(quota.RetryQuota())
        self.handler = AioRetryHandler(
            retry_policy=AioRetryPolicy(
                retry_checker=AioStandardRetryConditions(max_attempts=1 + config.retries),
                retry_backoff=Backoff(),
            ),
            retry_event_adapter=RetryEventAdapter(),
            retry_quota=self.quota,
        )

    def register(self, session) -> None:
        session.register("needs-retry.s3", self.needs_retry, unique_id="retry-config-s3")
        session.register("after-call.s3", self.quota.release_retry_quota, unique_id="sslfer-retry-quota-s3")

    async def needs_retry(self, **kwargs):
        delay = await self.handler.needs_retry(**kwargs)
        if delay is not None and delay is not False:  # a retry (a jittered 0.0 is an immediate one)
            log.warning(
                "store: transient %s on %s %s; retry %d/%d in %.2f s",
                _describe_attempt(kwargs), kwargs["operation"].name, _request_url(kwargs),
                kwargs["attempts"], self.config.retries, delay,
            )  # fmt: skip
        return delay


def _describe_attempt(kwargs: dict) -> str:
    if kwargs.get("caught_exception") is not None:
        return type(kwargs["caught_exception"]).__name__
    http, parsed = kwargs["response"]
    code = (parsed or {}).get("Error", {}).get("Code")
    return f"HTTP {http.status_code}" + (f" {code}" if code else "")


def _request_url(kwargs: dict) -> str:
    url = str((kwargs.get("request_dict") or {}).get("url", ""))
    return url.split("?", 1)[0]  # the endpoint and bucket/key path; query strings are not for logs


def _filesystem():
    """An s3fs filesystem built from the current environment.

    Cached per (environment, pid): tests change the env with monkeypatch, and a forked worker must not share
    its parent's event loop/session.
    """
    import aiobotocore.session
    import s3fs

    env_key = tuple(
        os.environ.get(v)
        for v in (*ENDPOINT_VARS, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    )
    cache_key = (env_key, os.getpid(), id(_config))
    with _fs_lock:
        fs = _filesystems.get(cache_key)
        if fs is None:
            session = aiobotocore.session.AioSession()
            _StandardRetries(_config).register(session)
            fs = s3fs.S3FileSystem(
                key=os.environ.get("AWS_ACCESS_KEY_ID") or None,
                secret=os.environ.get("AWS_SECRET_ACCESS_KEY") or None,
                endpoint_url=endpoint(),
                session=session,
                client_kwargs={"region_name": os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"},
                config_kwargs={
                    # botocore retries every request (standard mode, jittered); see the module docstring.
                    "retries": {"mode": "standard", "total_max_attempts": 1 + _config.retries},
                    "connect_timeout": _config.connect_timeout_s,
                    "read_timeout": _config.read_timeout_s,
                },
                default_block_size=_config.block_size,
                skip_instance_cache=True,
                use_listings_cache=False,  # other processes write the same prefixes
            )
            # s3fs's own loop (fixed waits, no jitter) would repeat what botocore already retried; failures while
            # a body streams in are retried by _with_retries / _CountingReader.
            fs.retries = 1
            _filesystems[cache_key] = fs
    return fs


# ---------------------------------------------------------------- error classification and retries


def _chain(err: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while err is not None and err not in seen:
        seen.append(err)
        err = err.__cause__ or err.__context__
    return seen


def _error_code(err: BaseException) -> str:
    for item in _chain(err):
        response = getattr(item, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code", ""))
    return ""


# Failures while a response body streams in: after botocore returned the response, so never retried by it.
BODY_ERRORS = {
    "ResponseStreamingError",
    "AioReadTimeoutError",
    "IncompleteRead",
    "IncompleteReadError",
    "ClientPayloadError",
    "FSTimeoutError",
}


def _retried_by_botocore(err: BaseException) -> bool:
    """``err`` came out of botocore's request loop, which already applied the standard retry policy."""
    from botocore.exceptions import BotoCoreError, ClientError

    chain = _chain(err)
    if {type(e).__name__ for e in chain} & BODY_ERRORS:
        return False
    return any(isinstance(e, BotoCoreError | ClientError) for e in chain)


def _is_transient(err: BaseException) -> bool:
    """Worth another try: refused/reset connections, timeouts, throttling, 5xx, a body cut off mid-stream."""
    code = _error_code(err)
    if code in {
        "500",
        "502",
        "503",
        "504",
        "SlowDown",
        "InternalError",
        "ServiceUnavailable",
        "RequestTimeout",
    }:
        return True
    names = {type(e).__name__ for e in _chain(err)}
    transient_names = {
        "EndpointConnectionError",
        "ConnectionRefusedError",
        "ConnectionResetError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
        "ServerDisconnectedError",
        *BODY_ERRORS,
    }
    return bool(names & transient_names)


def _user_error(err: BaseException, url: str, write: bool) -> StoreError | None:
    """Translate a failure into a StoreError naming the setting and the fix (None: not a user error)."""
    names = {type(e).__name__ for e in _chain(err)}
    code = _error_code(err)
    text = " ".join(str(e) for e in _chain(err))
    if "NoCredentialsError" in names or "Unable to locate credentials" in text:
        return StoreError(f"no S3 credentials for {url}: {CREDENTIALS_HINT}")
    if code in {"InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "AccessDenied", "Forbidden"} or (
        "PermissionError" in names and is_s3(url)
    ):
        key = os.environ.get("AWS_ACCESS_KEY_ID", "<unset>")
        return StoreError(
            f"the S3 store at {endpoint() or 'the default AWS endpoint'} rejected the credentials for {url} "
            f"({code or 'access denied'}; AWS_ACCESS_KEY_ID={key}): check AWS_ACCESS_KEY_ID and "
            f"AWS_SECRET_ACCESS_KEY match the store's keys, and that this key may "
            f"{'write' if write else 'read'} bucket '{_bucket(url)}'"
        )
    if {"EndpointConnectionError", "ConnectionRefusedError", "ClientConnectorError"} & names:
        return StoreError(
            f"cannot reach the S3 endpoint {endpoint() or '(AWS default)'} for {url}: set "
            f"AWS_ENDPOINT_URL_S3 to the store's address (is the store running? "
            f"python -m launch.services store start --dir DIR)"
        )
    if code == "NoSuchBucket" or "specified bucket does not exist" in text:
        return StoreError(
            f"bucket '{_bucket(url)}' does not exist on {endpoint() or 'S3'} (URL {url}): create it or fix the URL"
        )
    if not is_s3(url) and isinstance(err, PermissionError | IsADirectoryError | NotADirectoryError):
        return StoreError(
            f"cannot {'write' if write else 'read'} local path {url}: {err.strerror or err} "
            f"(choose a writable destination or fix its permissions)"
        )
    if not is_s3(url) and write and isinstance(err, OSError) and not isinstance(err, FileNotFoundError):
        return StoreError(f"cannot write local path {url}: {err} (choose a writable destination)")
    return None


def _with_retries(fn: Callable[[], T], url: str, write: bool = False, body_only: bool = False) -> T:
    """Run ``fn``; retry transient errors that botocore did not already retry; translate user errors.

    An S3 request's own failures (refused connection, 5xx...) were retried by botocore's standard mode and are
    final here. What is left: failures while a body streams in, and local/other transient errors. Waits are
    full jitter (:func:`backoff_delay`). ``body_only``: retry only the S3 body errors (reads of an open object).
    """
    attempt = 0
    while True:
        try:
            return fn()
        except FileNotFoundError as err:
            if is_s3(url) and _error_code(err) == "NoSuchBucket":
                raise _user_error(err, url, write) from err
            raise
        except Exception as err:
            retry = _is_transient(err) and not _retried_by_botocore(err)
            if body_only:
                retry = retry and bool({type(e).__name__ for e in _chain(err)} & BODY_ERRORS)
            if retry and attempt < _config.retries:
                wait = backoff_delay(attempt)
                log.warning(
                    "store: transient %s on %s; retry %d/%d in %.2f s",
                    type(err).__name__, url, attempt + 1, _config.retries, wait,
                )  # fmt: skip
                time.sleep(wait)
                attempt += 1
                continue
            user = _user_error(err, url, write)
            if user is not None:
                raise user from err
            raise


# ---------------------------------------------------------------- public operations


@contextlib.contextmanager
def open_url(url: str, mode: str = "rb") -> Iterator[IO[bytes]]:
    """Open a local path or ``s3://`` object in binary mode (``rb``/``wb``); reads are counted."""
    if mode not in ("rb", "wb"):
        raise ValueError(f"open_url supports 'rb' and 'wb', not {mode!r}")
    url = str(url)
    if is_s3(url):
        fs = _filesystem()
        handle = _with_retries(lambda: fs.open(_s3_path(url), mode), url, write=mode == "wb")
    else:
        if mode == "wb":
            _with_retries(lambda: Path(url).parent.mkdir(parents=True, exist_ok=True), url, write=True)
        handle = _with_retries(lambda: open(url, mode), url, write=mode == "wb")  # noqa: SIM115 - closed below
    stream = _CountingReader(handle, url if is_s3(url) else None) if mode == "rb" else handle
    try:
        yield stream
    finally:
        if mode == "wb" and is_s3(url):
            _with_retries(handle.close, url, write=True)
        else:
            handle.close()


def read_bytes(url: str) -> bytes:
    """The whole object/file (raises FileNotFoundError if it does not exist)."""
    url = str(url)
    if is_s3(url):
        fs = _filesystem()
        data = _with_retries(lambda: fs.cat_file(_s3_path(url)), url)
    else:
        data = _with_retries(lambda: Path(url).read_bytes(), url)
    BYTES_READ.add(len(data))
    return data


def put_bytes(data: bytes, url: str) -> None:
    """Write ``data`` to ``url`` atomically (local: temp + rename; S3: a single PUT)."""
    url = str(url)
    if is_s3(url):
        fs = _filesystem()
        _with_retries(lambda: fs.pipe_file(_s3_path(url), data), url, write=True)
        return
    with tempfile.NamedTemporaryFile(delete=False) as tmp:
        tmp.write(data)
    try:
        put_file(tmp.name, url)
    finally:
        Path(tmp.name).unlink(missing_ok=True)


def put_file(local: str | Path, url: str, move: bool = False) -> None:
    """Publish a finished local file at ``url``: atomic rename locally, upload for S3.

    ``move=True`` lets a local publish rename ``local`` itself (no copy) when both are on one filesystem.
    """
    url = str(url)
    if is_s3(url):
        fs = _filesystem()
        _with_retries(lambda: fs.put_file(str(local), _s3_path(url)), url, write=True)
        return

    def publish() -> None:
        dest = Path(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Copy next to the destination first so the final rename is atomic on one filesystem.
        if move:
            try:
                os.replace(local, dest)
                return
            except OSError:
                pass  # another filesystem: copy below
        partial = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.partial")
        try:
            shutil.copyfile(local, partial)
            os.replace(partial, dest)
        finally:
            partial.unlink(missing_ok=True)

    _with_retries(publish, url, write=True)


def exists(url: str) -> bool:
    url = str(url)
    if is_s3(url):
        fs = _filesystem()
        return bool(_with_retries(lambda: fs.exists(_s3_path(url)), url))
    return Path(url).exists()


def list_dir(url: str) -> list[str]:
    """Sorted names (not paths) directly under a folder/prefix; empty if it does not exist."""
    url = str(url)
    if is_s3(url):
        fs = _filesystem()
        try:
            entries = _with_retries(lambda: fs.ls(_s3_path(url), detail=False), url)
        except FileNotFoundError:
            return []
        return sorted(basename(e) for e in entries)
    path = Path(url)
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


def remove(url: str) -> None:
    """Delete one file/object if present (used for write probes and cleanup)."""
    url = str(url)
    if is_s3(url):
        fs = _filesystem()
        with contextlib.suppress(FileNotFoundError):
            _with_retries(lambda: fs.rm_file(_s3_path(url)), url, write=True)
    else:
        Path(url).unlink(missing_ok=True)


def check_access(url: str, write: bool = False) -> None:
    """Fail early, with a clear StoreError, if ``url`` cannot be read (or written with ``write=True``)."""
    url = str(url)
    if is_s3(url):
        _check_s3(url, write)
    elif write:
        probe = Path(url) / f".write-probe-{uuid.uuid4().hex[:8]}"
        try:
            Path(url).mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"ok")
        except OSError as err:
            raise StoreError(
                f"cannot write to local destination {url}: {err.strerror or err} "
                f"(choose a writable --out or fix its permissions)"
            ) from err
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
    elif not Path(url).exists():
        raise StoreError(f"local path {url} does not exist: check the path")


def _check_s3(url: str, write: bool) -> None:
    if not os.environ.get("AWS_ACCESS_KEY_ID") or not os.environ.get("AWS_SECRET_ACCESS_KEY"):
        # botocore might still find a profile; only complain if it really has nothing.
        import botocore.session

        if botocore.session.get_session().get_credentials() is None:
            raise StoreError(f"no S3 credentials for {url}: {CREDENTIALS_HINT}")
    bucket = _bucket(url)
    if len(bucket) < 3:
        raise StoreError(
            f"bad S3 URL {url}: expected s3://bucket/prefix with a bucket name of 3-63 characters"
        )
    fs = _filesystem()
    try:
        _with_retries(lambda: fs.call_s3("head_bucket", Bucket=bucket), url, write)
    except FileNotFoundError as err:
        raise StoreError(
            f"bucket '{bucket}' does not exist on {endpoint() or 'S3'} (URL {url}): create it or fix the URL"
        ) from err
    if write:
        probe = join(url, f".write-probe-{uuid.uuid4().hex[:8]}")
        put_bytes(b"ok", probe)
        remove(probe)


# ---------------------------------------------------------------- WebDataset integration


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_kw) -> IO[bytes]:
    if mode != "rb":
        raise ValueError("the s3:// WebDataset handler only reads (write shards with ShardWriter)")
    fs = _filesystem()
    handle = _with_retries(
        lambda: fs.open(_s3_path(url), "rb", block_size=_config.block_size, cache_type="readahead"), url
    )
    return _CountingReader(handle, url)


def register_webdataset_s3() -> None:
    """Let ``webdataset.WebDataset("s3://bucket/prefix/shard-{000000..000009}.tar")`` stream via s3fs."""
    import webdataset

    webdataset.gopen_schemes["s3"] = _gopen_s3

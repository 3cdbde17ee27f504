"""Submit a command to a Ray cluster's Jobs API, follow its log, wait, and report its fate as an exit code.

Used by ``launch/ray_submit.py`` (the command line) and ``python -m eval --submit``. The working dir is uploaded
as the job's ``runtime_env`` (without .venv, .cache, runs, .git and caches), so the job runs this checkout's
code with the head's Python. Exit codes: 0 succeeded, 1 failed or stopped, 124 timed out (the job is stopped on
timeout or Ctrl-C), 130 interrupted.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

EXCLUDES = [
    ".venv",
    ".cache",
    "runs",
    "out",
    ".git",
    "__pycache__",
    "*.pyc",
    ".ruff_cache",
    ".pytest_cache",
    "*.egg-info",
]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


# Set for every Ray process the project starts or talks to.
# The object store's variables (data_shards.store reads them): forwarded to Ray workers, which do not
# necessarily inherit them from the driver.
STORE_ENV = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
)
RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # else Ray binds all interfaces despite 127.0.0.1
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",  # explicit, or job submission can fail after a local ray.init wrote a token
}


def ray_env() -> dict[str, str]:
    """RAY_ENV set in this process (unless already set); returns what the job's processes get on top of the
    cluster's own environment. Not the auth mode: a job inherits its cluster's (a token cluster's jobs get the
    token from the head), and a client's mode comes from its caller (``launch.ray_head`` prints it)."""
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    job = {k: v for k, v in RAY_ENV.items() if k != "RAY_AUTH_MODE"}
    return {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **job}


def refresh_auth_mode() -> None:
    """Make Ray's cached settings follow RAY_AUTH_MODE and the token as they are now: a process that used Ray
    before (a local ``ray.init``, another cluster) keeps what it saw first and would send no or a stale token."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()  # a token read for an earlier cluster is not this one's


def submit_and_wait(
    address: str,
    entrypoint: list[str],
    working_dir: str | None = ".",
    timeout_s: float = 3600.0,
    follow: bool = True,
    copy_results: str | None = None,
    poll_s: float = 1.0,
    out=sys.stdout,
) -> int:
    """Submit ``entrypoint`` as a job, stream its log to ``out``, wait up to ``timeout_s``; return an exit code."""
    from ray.job_submission import JobSubmissionClient

    env_vars = ray_env()
    refresh_auth_mode()
    client = JobSubmissionClient(address)
    runtime_env: dict = {"env_vars": env_vars}
    if working_dir:
        runtime_env.update(working_dir=str(Path(working_dir).resolve()), excludes=EXCLUDES)
    command = shlex.join(entrypoint)
    job_id = client.submit_job(entrypoint=command, runtime_env=runtime_env)
    print(f"submitted job {job_id} to {address}: {command}", file=out, flush=True)
    deadline = time.monotonic() + timeout_s
    try:
        if follow:
            # The SDK's log tail (a websocket): each new chunk once, not the whole log re-read every poll.
            _tail_until(client, job_id, out, deadline)
        status = _wait_terminal(client, job_id, deadline, poll_s)
        if status not in TERMINAL:
            client.stop_job(job_id)
            print(f"job {job_id} still {status} after {timeout_s:g} s: stopped it", file=out, flush=True)
            return 124
    except KeyboardInterrupt:
        client.stop_job(job_id)
        print(f"interrupted: stopped job {job_id}", file=out, flush=True)
        return 130
    info = client.get_job_info(job_id)
    print(f"job {job_id} {status}" + (f": {info.message}" if info.message else ""), file=out, flush=True)
    if status != "SUCCEEDED":
        return 1
    if copy_results:
        _copy_results(entrypoint, copy_results, out)
    return 0


def _tail_until(client, job_id: str, out, deadline: float) -> None:
    """Stream the job's log to ``out`` until the job ends (the tail closes) or ``deadline`` passes."""

    async def follow() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(asyncio.wait_for(follow(), timeout=max(0.0, deadline - time.monotonic())))
    except TimeoutError:
        pass  # the caller stops the job


def _wait_terminal(client, job_id: str, deadline: float, poll_s: float) -> str:
    """The job's status once terminal, or its current status when ``deadline`` passes."""
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(poll_s)


def default_address() -> str:
    """Where jobs go without ``--address``: ``RAY_ADDRESS`` as Ray's own tools read it, then
    ``RAY_DASHBOARD_URL`` (printed by ``launch/ray_head.py``), then the local dashboard."""
    return os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_DASHBOARD_URL") or "http://127.0.0.1:8265"


def output_dir(entrypoint: list[str]) -> str | None:
    """The value of ``--out`` in the entrypoint, if any."""
    for i, arg in enumerate(entrypoint):
        if arg == "--out" and i + 1 < len(entrypoint):
            return entrypoint[i + 1]
        if arg.startswith("--out="):
            return arg.split("=", 1)[1]
    return None


def _copy_results(entrypoint: list[str], dest: str, out) -> None:
    src = output_dir(entrypoint)
    if not src or not Path(src).is_absolute() or not Path(src).is_dir():
        print(
            f"results not copied: the job's --out ({src}) is not an absolute folder visible here; "
            "they stay on the cluster at that path",
            file=out,
        )
        return
    if Path(src).resolve() != Path(dest).resolve():
        shutil.copytree(src, dest, dirs_exist_ok=True)
    print(f"results in {dest}", file=out)

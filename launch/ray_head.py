"""A real Ray head node on loopback, started and stopped by PID (for tests, demos and single-box clusters).

    python -m launch.ray_head start --dir .cache/ray-head [--num-cpus 2]   # prints RAY_ADDRESS / dashboard URL
    python -m launch.ray_head status --dir .cache/ray-head
    python -m launch.ray_head stop --dir .cache/ray-head
    python -m launch.ray_head join --head-dir .cache/ray-head --dir .cache/ray-node1 [--num-cpus 1]  # a 2nd node
    python -m launch.ray_head stop --dir .cache/ray-node1

The head runs ``ray start --head --block`` in its own process group: stopping kills that group, i.e. exactly
the GCS, raylet, dashboard and workers this head started. (``ray stop`` would kill every Ray process of the
user on the machine, other people's clusters included.) Readiness = the dashboard's Jobs API answers over HTTP.
Jobs' ``python`` is the head's: the head is started with this interpreter's bin folder first on PATH.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from common.ray_jobs import RAY_ENV
from launch.services import (
    ServiceError,
    export_lines,
    free_port,
    pid_alive,
    process_start_time,
    same_process,
    stop_pid,
    write_private,
)


def _start_blocking(service: RayHead | RayNode, cmd: list[str], log_path: Path) -> None:
    """Run ``ray start ... --block`` in its own process group (stopping kills exactly that group) and wait
    until ``service`` is ready; whatever was started is stopped if it never gets there."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=service.env(), start_new_session=True
        )
    service.pid = proc.pid
    try:
        service._wait_ready(proc, log_path)
    except BaseException:
        service.stop()
        raise


def _record(path: Path, pid: int, **fields) -> None:
    """The state file ``status``/``stop`` read: the PID with its start time (a reused PID is not ours)."""
    path.write_text(json.dumps({"pid": pid, "pid_start": process_start_time(pid), **fields}))


@dataclass
class RayHead:
    """``ray start --head`` on 127.0.0.1 with a capped object store and a private temp dir."""

    state_dir: Path
    num_cpus: int = 2
    num_gpus: int | None = None
    object_store_memory: int = 500_000_000
    port: int = 0  # GCS port
    dashboard_port: int = 0
    startup_timeout_s: float = 90.0
    stop_grace_s: float = 3.0  # Ray drains up to 30 s on SIGTERM; a private head needs no drain: then SIGKILL
    pid: int | None = None
    temp_dir: str = ""  # default: a fresh /tmp/rayh-* folder, removed on stop (logs: state_dir/head.log)
    # token: every Ray port (GCS, dashboard, Jobs API) needs the token in state_dir/auth_token (0600), made at
    # start; disabled: anyone who can reach the ports can run code (only for throwaway heads on a private box).
    auth: str = "token"
    # Ray's internal settings (``ray start --system-config``), e.g. faster node-death detection in tests.
    system_config: dict | None = None
    _own_temp_dir: bool = field(default=False, init=False, repr=False)

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def token_path(self) -> Path:
        return Path(self.state_dir) / "auth_token"

    def client_env(self) -> dict[str, str]:
        """What a client (job submission, ``ray.init``) needs in its environment to talk to this head."""
        if self.auth != "token":
            return {"RAY_AUTH_MODE": "disabled"}
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}

    def _auth_headers(self) -> dict[str, str]:
        if self.auth != "token":
            return {}
        return {"Authorization": f"Bearer {self.token_path.read_text().strip()}"}

    def env(self) -> dict[str, str]:
        """Environment of the head (and so of its jobs): venv first on PATH, loopback-only Ray settings."""
        env = dict(os.environ)
        env.update(RAY_ENV)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.setdefault("OMP_NUM_THREADS", "1")
        env.pop("RAY_ADDRESS", None)
        env.pop("RAY_AUTH_TOKEN", None)  # the head reads its token from its own file, never from the caller
        env.update(self.client_env())
        return env

    def start(self) -> RayHead:
        self.state_dir = Path(self.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if (self.state_dir / "head.json").exists():
            raise ServiceError(f"a Ray head was already started from {self.state_dir}: stop it first")
        if self.auth == "token":
            write_private(self.token_path, secrets.token_hex(32))
        self.port = self.port or free_port()
        self.dashboard_port = self.dashboard_port or free_port()
        # Short path: Ray's unix sockets live under it and socket paths are limited to ~107 bytes.
        if not self.temp_dir:
            self.temp_dir, self._own_temp_dir = tempfile.mkdtemp(prefix="rayh-", dir="/tmp"), True
        cmd = [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            "--block",
            f"--num-cpus={self.num_cpus}",
            f"--object-store-memory={self.object_store_memory}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--port={self.port}",
            # Fixed defaults (10001, 52365) would clash with another head on the same machine.
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            "--node-ip-address=127.0.0.1",
            "--disable-usage-stats",
            f"--temp-dir={self.temp_dir}",
        ]
        if self.num_gpus is not None:
            cmd.append(f"--num-gpus={self.num_gpus}")
        if self.system_config:
            cmd.append(f"--system-config={json.dumps(self.system_config)}")
        _start_blocking(self, cmd, self.state_dir / "head.log")
        _record(self.state_dir / "head.json", self.pid, auth=self.auth,
                token_path=str(self.token_path) if self.auth == "token" else None,
                gcs_address=self.gcs_address, dashboard_url=self.dashboard_url, temp_dir=self.temp_dir)  # fmt: skip
        return self

    def _wait_ready(self, proc, log_path: Path) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        last = "no answer yet"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = log_path.read_text()[-2000:]
                raise ServiceError(f"ray start exited with code {proc.returncode}; log tail:\n{tail}")
            try:
                # The Jobs API answering means the dashboard head and its job manager are up.
                request = urllib.request.Request(
                    f"{self.dashboard_url}/api/jobs/", headers=self._auth_headers()
                )
                with urllib.request.urlopen(request, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError as err:
                last = str(err)
            time.sleep(0.3)
        raise ServiceError(
            f"Ray head dashboard {self.dashboard_url} not ready after {self.startup_timeout_s:.0f} s "
            f"({last}); see {log_path}"
        )

    def stop(self) -> None:
        if self.pid is not None:
            stop_pid(self.pid, timeout_s=self.stop_grace_s)
        (Path(self.state_dir) / "head.json").unlink(missing_ok=True)
        if self._own_temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.pid = None

    def __enter__(self) -> RayHead:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# `ray start` for a joining node, with the head's 127.0.0.1 address kept as given: with multi-node enabled
# (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1) Ray rewrites a loopback --address to the machine's outward IP, where a
# loopback-only head does not listen. The node's own services still use --node-ip-address=127.0.0.1.
_JOIN_LOOPBACK = (
    "import sys; import ray._private.services as s; s.resolve_ip_for_localhost = lambda host: host; "
    "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; sys.exit(main())"
)


@dataclass
class RayNode:
    """A worker node joining a head: ``ray start --address HEAD --block`` on 127.0.0.1 in its own process group,
    with its own ports, temp dir and CPUs/resources, so one machine can hold a real multi-node cluster (separate
    raylets and object stores) that tests can take a node away from."""

    state_dir: Path
    gcs_address: str
    dashboard_url: str  # the head's: readiness = the head lists this node as ALIVE
    auth: str = "token"
    token_path: Path | None = None  # the head's auth_token (token auth)
    num_cpus: int = 1
    num_gpus: int | None = None
    resources: dict[str, float] | None = None  # custom resources, e.g. {"trainer": 1}
    object_store_memory: int = 200_000_000
    startup_timeout_s: float = 90.0
    stop_grace_s: float = 3.0
    pid: int | None = None
    node_name: str = ""  # default: the state folder's name (unique per node on this machine)
    node_id: str = ""  # Ray's id for this node, known once it is ready
    temp_dir: str = ""
    _own_temp_dir: bool = field(default=False, init=False, repr=False)

    @classmethod
    def joining(cls, head: RayHead, state_dir: Path, **kwargs) -> RayNode:
        token = head.token_path if head.auth == "token" else None
        return cls(state_dir, head.gcs_address, head.dashboard_url, head.auth, token, **kwargs)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(RAY_ENV)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.setdefault("OMP_NUM_THREADS", "1")
        env.pop("RAY_ADDRESS", None)
        env.pop("RAY_AUTH_TOKEN", None)
        # RAY_ENV's 0 makes `ray start --address` refuse to join (see _JOIN_LOOPBACK for the 1 it needs).
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"
        if self.auth == "token":
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path))
        else:
            env["RAY_AUTH_MODE"] = "disabled"
        return env

    def start(self) -> RayNode:
        self.state_dir = Path(self.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if (self.state_dir / "node.json").exists():
            raise ServiceError(f"a Ray node was already started from {self.state_dir}: stop it first")
        if self.auth == "token" and not (self.token_path and Path(self.token_path).exists()):
            raise ServiceError(
                f"token auth needs the head's auth_token file; {self.token_path} does not exist"
            )
        self.node_name = self.node_name or self.state_dir.name
        if not self.temp_dir:
            self.temp_dir, self._own_temp_dir = tempfile.mkdtemp(prefix="rayn-", dir="/tmp"), True
        cmd = [
            sys.executable,
            "-c",
            _JOIN_LOOPBACK,
            "start",
            f"--address={self.gcs_address}",
            "--block",
            f"--num-cpus={self.num_cpus}",
            f"--object-store-memory={self.object_store_memory}",
            f"--node-name={self.node_name}",
            "--node-ip-address=127.0.0.1",
            # The head took its agent port; a fixed default would clash with it.
            f"--dashboard-agent-listen-port={free_port()}",
            "--disable-usage-stats",
            f"--temp-dir={self.temp_dir}",
        ]
        if self.num_gpus is not None:
            cmd.append(f"--num-gpus={self.num_gpus}")
        if self.resources:
            cmd.append(f"--resources={json.dumps(self.resources)}")
        _start_blocking(self, cmd, self.state_dir / "node.log")
        _record(self.state_dir / "node.json", self.pid, node_id=self.node_id, node_name=self.node_name,
                gcs_address=self.gcs_address, temp_dir=self.temp_dir)  # fmt: skip
        return self

    def _alive_node_id(self) -> str | None:
        """This node's id once the head's GCS lists it ALIVE (the head's state API, with the token)."""
        headers = {}
        if self.auth == "token":
            headers["Authorization"] = f"Bearer {Path(self.token_path).read_text().strip()}"
        request = urllib.request.Request(f"{self.dashboard_url}/api/v0/nodes?limit=1000", headers=headers)
        with urllib.request.urlopen(request, timeout=5) as resp:
            nodes = json.loads(resp.read())["data"]["result"]["result"]
        for node in nodes:
            if node.get("node_name") == self.node_name and node.get("state") == "ALIVE":
                return node["node_id"]
        return None

    def _wait_ready(self, proc, log_path: Path) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        last = "not listed yet"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = log_path.read_text()[-2000:]
                raise ServiceError(
                    f"ray start (worker node) exited with code {proc.returncode}; log tail:\n{tail}"
                )
            try:
                node_id = self._alive_node_id()
                if node_id:
                    self.node_id = node_id
                    return
            except (OSError, ValueError, KeyError) as err:
                last = str(err)
            time.sleep(0.5)
        raise ServiceError(
            f"Ray node {self.node_name} not ALIVE at {self.gcs_address} after {self.startup_timeout_s:.0f} s "
            f"({last}); see {log_path}"
        )

    def process_ids(self) -> list[int]:
        """PIDs of this node's processes: ``ray start``, its raylet, agents and Ray workers (its descendants)."""
        import psutil

        if self.pid is None or not pid_alive(self.pid):
            return []
        try:
            root = psutil.Process(self.pid)
            return [self.pid, *(p.pid for p in root.children(recursive=True))]
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        if self.pid is not None:
            stop_pid(self.pid, timeout_s=self.stop_grace_s)
        (Path(self.state_dir) / "node.json").unlink(missing_ok=True)
        if self._own_temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.pid = None

    def __enter__(self) -> RayNode:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _join(args: argparse.Namespace, state: Path) -> int:
    head_info = Path(args.head_dir) / "head.json"
    if not head_info.exists():
        print(
            f"error: no Ray head recorded in {args.head_dir} (--head-dir): start one first", file=sys.stderr
        )
        return 2
    info = json.loads(head_info.read_text())
    resources = json.loads(args.resources) if args.resources else None
    node = RayNode(
        state,
        info["gcs_address"],
        info["dashboard_url"],
        auth=info.get("auth", "token"),
        token_path=Path(info["token_path"]) if info.get("token_path") else None,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        resources=resources,
        object_store_memory=args.object_store_memory,
    ).start()
    print(f"# Ray node {node.node_name} ({node.node_id}) joined {node.gcs_address}, pid {node.pid}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.ray_head", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["start", "join", "stop", "status"])
    parser.add_argument("--dir", default=".cache/ray-head", help="state folder (pid, addresses, log)")
    parser.add_argument("--head-dir", default=".cache/ray-head", help="join: the head's state folder")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--num-gpus", type=int, default=None)
    parser.add_argument(
        "--resources", default=None, help="join: custom resources as JSON, e.g. '{\"trainer\": 1}'"
    )
    parser.add_argument("--object-store-memory", type=int, default=500_000_000)
    parser.add_argument("--dashboard-port", type=int, default=8265)
    args = parser.parse_args(argv)
    state = Path(args.dir)
    if args.action == "join":
        return _join(args, state)
    if args.action == "start":
        head = RayHead(
            state,
            num_cpus=args.num_cpus,
            num_gpus=args.num_gpus,
            object_store_memory=args.object_store_memory,
            dashboard_port=args.dashboard_port,
        ).start()
        print(
            f"# Ray head running, pid {head.pid}; jobs: python -m launch.ray_submit --address {head.dashboard_url}"
        )
        print(export_lines({"RAY_ADDRESS": head.gcs_address, "RAY_DASHBOARD_URL": head.dashboard_url,
                            **head.client_env()}), end="")  # fmt: skip
        return 0
    kind = "node" if (state / "node.json").exists() else "head"
    info_path = state / f"{kind}.json"
    if not info_path.exists():
        print(f"no Ray head or node recorded in {state}", file=sys.stderr)
        return 1
    info = json.loads(info_path.read_text())
    if args.action == "status":
        alive = same_process(int(info["pid"]), info.get("pid_start"))
        where = f"dashboard {info['dashboard_url']}" if kind == "head" else f"node {info['node_id']}"
        print(f"Ray {kind} pid {info['pid']} {'running' if alive else 'not running'}; {where}")
        return 0 if alive else 1
    if same_process(int(info["pid"]), info.get("pid_start")):
        stop_pid(int(info["pid"]), timeout_s=5.0)
    else:  # the recorded PID now names another process: never signal it
        print(
            f"Ray {kind} pid {info['pid']} is no longer running (that PID now names another process, left alone)"
        )
    if Path(info["temp_dir"]).name.startswith(("rayh-", "rayn-")):
        shutil.rmtree(info["temp_dir"], ignore_errors=True)
    info_path.unlink()
    print(f"stopped Ray {kind} pid {info['pid']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

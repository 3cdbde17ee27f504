"""A real Ray head node on loopback, started and stopped by PID (for tests, demos and single-box clusters).

    python -m launch.ray_head start --dir .cache/ray-head [--num-cpus 2]   # prints RAY_ADDRESS / dashboard URL
    python -m launch.ray_head status --dir .cache/ray-head
    python -m launch.ray_head stop --dir .cache/ray-head

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
    process_start_time,
    same_process,
    stop_pid,
    write_private,
)


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
        log_path = self.state_dir / "head.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True
            )
        self.pid = proc.pid
        try:
            self._wait_ready(proc, log_path)
        except BaseException:
            self.stop()
            raise
        (self.state_dir / "head.json").write_text(
            json.dumps(
                {
                    "pid": self.pid,
                    "pid_start": process_start_time(self.pid),
                    "auth": self.auth,
                    "token_path": str(self.token_path) if self.auth == "token" else None,
                    "gcs_address": self.gcs_address,
                    "dashboard_url": self.dashboard_url,
                    "temp_dir": self.temp_dir,
                }
            )
        )
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.ray_head", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--dir", default=".cache/ray-head", help="state folder (pid, addresses, log)")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--num-gpus", type=int, default=None)
    parser.add_argument("--object-store-memory", type=int, default=500_000_000)
    parser.add_argument("--dashboard-port", type=int, default=8265)
    args = parser.parse_args(argv)
    state = Path(args.dir)
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
    info_path = state / "head.json"
    if not info_path.exists():
        print(f"no Ray head recorded in {state}", file=sys.stderr)
        return 1
    info = json.loads(info_path.read_text())
    if args.action == "status":
        alive = same_process(int(info["pid"]), info.get("pid_start"))
        print(f"pid {info['pid']} {'running' if alive else 'not running'}; dashboard {info['dashboard_url']}")
        return 0 if alive else 1
    if same_process(int(info["pid"]), info.get("pid_start")):
        stop_pid(int(info["pid"]), timeout_s=5.0)
    else:  # the recorded PID now names another process: never signal it
        print(
            f"Ray head pid {info['pid']} is no longer running (that PID now names another process, left alone)"
        )
    if Path(info["temp_dir"]).name.startswith("rayh-"):
        shutil.rmtree(info["temp_dir"], ignore_errors=True)
    info_path.unlink()
    print(f"stopped Ray head pid {info['pid']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Submit a command to a Ray cluster's Jobs API, follow its log, wait, and report success or failure.

    python -m launch.ray_submit --address http://127.0.0.1:8265 --working-dir . [--timeout 3600] \\
        [--copy-results DEST] -- python -m eval --checkpoint ... --data ... --out /shared/eval-1

The working dir is uploaded as the job's ``runtime_env`` (without .venv, .cache, runs, .git and caches), so the
job runs this checkout's code with the head's Python (start the head with the venv on PATH:
``launch.ray_head`` does). Exit code: the job's fate (0 succeeded, 1 failed or stopped, 124 timed out; the job
is stopped on timeout or Ctrl-C).

Results: a job writes where its command says. Relative ``--out`` paths land in the job's temporary copy of the
working dir on the cluster and are lost; give an absolute path that this machine can also read (same host or a
shared filesystem). With ``--copy-results DEST`` the ``--out`` folder is then copied to DEST after success;
if it is not visible here, a message says where it is on the cluster.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python launch/ray_submit.py` from anywhere

from common.ray_jobs import default_address, submit_and_wait  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print(
            "usage: python -m launch.ray_submit [options] -- COMMAND ... (the '--' is required)",
            file=sys.stderr,
        )
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m launch.ray_submit", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--address",
        default=default_address(),
        help="Jobs API (http://HEAD:8265) or a Ray address; default: $RAY_ADDRESS, $RAY_DASHBOARD_URL, local",
    )
    parser.add_argument(
        "--working-dir", default=".", help="folder uploaded as the job's working dir ('' = none)"
    )
    parser.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds to wait before stopping the job"
    )
    parser.add_argument("--no-follow", action="store_true", help="do not stream the job's log")
    parser.add_argument(
        "--copy-results", default=None, help="copy the command's --out folder here afterwards"
    )
    args = parser.parse_args(argv[:split])
    command = argv[split + 1 :]
    if not command:
        print("error: no command after '--'", file=sys.stderr)
        return 2
    try:
        return submit_and_wait(
            args.address,
            command,
            working_dir=args.working_dir or None,
            timeout_s=args.timeout,
            follow=not args.no_follow,
            copy_results=args.copy_results,
        )
    except ConnectionError as err:
        print(f"error: --address {args.address}: cannot reach the Ray Jobs API ({err})", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

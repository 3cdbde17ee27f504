"""Inline input vs input threads when the shards sit behind a slow network: the trainer reading the local S3 store
through a proxy that adds a round-trip delay.

``data.num_workers=auto`` runs the input inline where no core is spare (2 CPU ranks on 2 cores) for data on
local disks, and starts one thread per rank for ``s3://`` data. This measures why: the store's round trips are
waits, and inline they stall the step, while one thread per rank hides them. One run: a SeaweedFS store on
loopback, a SynthFace corpus written into it (the demo's: 48 identities x 4 clips of 12 s, 12 clips per shard), a
TCP proxy in front of it that holds every response burst for ``--latency-ms``, then ``deepspeed --num_gpus 2
launch/pretrain.py`` with ``launch/configs/demo.yaml`` (FaceSwap from the first step) through the proxy, for each
``--workers`` value in turn, ``--repeats`` times.

    python bench/bench_remote_store.py                          # 20 ms, workers 0 and 1, 2 repeats (~3 min)
    python bench/bench_remote_store.py --latency-ms 0 --steps 60 --repeats 1      # the store without delay

Reported per run: wall seconds of the steps after the first logging window (from metrics.jsonl timestamps),
median images/s of those windows, and the mean data-wait and input-prep shares of a step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

BURST_GAP_S = 0.005  # bytes arriving after a pause this long start a new response: one more round trip


class DelayProxy:
    """A TCP proxy on 127.0.0.1 to ``target_port`` that holds each burst of server bytes for ``delay_s``.

    A crude stand-in for a remote store: every response (and every part of a body that pauses) arrives one
    round trip late; requests go through at once. Runs an asyncio loop in a daemon thread; ``stop()`` ends it."""

    def __init__(self, target_port: int, delay_s: float) -> None:
        self.target_port, self.delay_s = target_port, delay_s
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="delay-proxy", daemon=True)

    async def _pipe(self, reader, writer, delay_s: float) -> None:
        last = 0.0
        try:
            while data := await reader.read(1 << 16):
                if delay_s and time.monotonic() - last > BURST_GAP_S:
                    await asyncio.sleep(delay_s)
                last = time.monotonic()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, client_reader, client_writer) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            self._pipe(client_reader, server_writer, 0.0),
            self._pipe(server_reader, client_writer, self.delay_s),
        )

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:  # open connections: cancel their pipes while the loop still runs, so each closes its socket
            server.close()
            tasks = asyncio.all_tasks(self._loop)
            for task in tasks:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self._loop.run_until_complete(server.wait_closed())
            self._loop.close()

    def start(self) -> DelayProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the delay proxy did not start")
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def summarise(rows: list[dict]) -> dict[str, float]:
    """metrics.jsonl rows -> wall s and medians/means over the windows after the first (start-up) one."""
    rows = [r for r in rows if "images_per_s" in r]
    if len(rows) < 2:
        raise ValueError(f"need at least 2 logging windows, got {len(rows)}")
    later = rows[1:]
    return {
        "wall_s": rows[-1]["time"] - rows[0]["time"],
        "images_per_s": statistics.median(r["images_per_s"] for r in later),
        "data_wait": statistics.mean(r["data_wait_fraction"] for r in later),
        "input_prep": statistics.mean(r["input_prep_fraction"] for r in later),
        "steps": f"{rows[0]['step'] + 1}-{rows[-1]['step']}",
    }


def run_trainer(env: dict[str, str], url: str, run_dir: Path, workers: int, steps: int) -> dict[str, float]:
    from pretrain.distributed import free_port

    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "launch/pretrain.py", "--config", "launch/configs/demo.yaml", f"run_dir={run_dir}", f"data.url={url}",
           f"max_steps={steps}", "resume=never", "faceswap.start_step=0", "faceswap.p_warmup_steps=0",
           "metrics.enabled=false", "checkpoint_every=0", f"data.num_workers={workers}"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    metrics = run_dir / "metrics.jsonl"
    if proc.returncode != 0 or not metrics.is_file():
        raise RuntimeError(
            f"trainer run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}"
        )
    return summarise([json.loads(x) for x in metrics.read_text().splitlines() if x.strip()])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latency-ms", type=float, default=20.0, help="delay per response burst (0: none)")
    p.add_argument("--workers", default="0,1", help="comma list of data.num_workers values")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--identities", type=int, default=48)
    args = p.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    if args.latency_ms < 0 or args.steps < 10 or args.repeats < 1 or min(workers) < 0:
        p.error("--latency-ms >= 0, --steps >= 10, --repeats >= 1, --workers >= 0")
    from bench_step import bench_env  # the environment bench_step's trainer runs get

    from launch.services import ObjectStore

    env = bench_env("cpu")
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="bench_remote_") as tmp,
        ObjectStore(data_dir=Path(tmp) / "store") as st,
    ):
        env.update(st.env())
        url = st.url("bench/pretrain")
        subprocess.run([sys.executable, "-m", "data_shards", "synth", "--out", url, "--identities",
                        str(args.identities), "--clips-per-identity", "4", "--seconds", "12", "--seed", "0",
                        "--shard-samples", "12", "--no-progress"], env=env, cwd=REPO, check=True,
                       capture_output=True)  # fmt: skip
        with DelayProxy(st.port, args.latency_ms / 1000) as proxy:
            env["AWS_ENDPOINT_URL_S3"] = f"http://127.0.0.1:{proxy.port}"
            for repeat in range(args.repeats):
                for w in workers:
                    run_dir = Path(tmp) / f"run_{w}_{repeat}"
                    row = {
                        "workers": w,
                        "repeat": repeat + 1,
                        **run_trainer(env, url, run_dir, w, args.steps),
                    }
                    print(f"  num_workers={w} repeat {repeat + 1}: {row['wall_s']:.1f} s, "
                          f"{row['images_per_s']:.0f} img/s", flush=True)  # fmt: skip
                    rows.append(row)
    print(
        f"\n{args.latency_ms:g} ms per response burst, launch/configs/demo.yaml on 2 CPU ranks, {args.steps} steps"
    )
    print("| data.num_workers | repeat | steps | wall s | images/s (median) | data wait | input prep |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['repeat']} | {r['steps']} | {r['wall_s']:.1f} | {r['images_per_s']:.0f} | "
              f"{100 * r['data_wait']:.1f}% | {100 * r['input_prep']:.1f}% |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Distributed ingest: the videos / photos of ``python -m data_shards ingest`` fanned out as Ray tasks.

    python -m data_shards ingest --videos PATH --out URL --ray [ADDRESS] [--workers N] [--json summary.json]
    python -m data_shards ingest --images DIR --out URL --ray [ADDRESS] ...

``--ray`` alone starts a local Ray cluster for the job (``--workers`` CPUs, default all) and stops it after, or
joins ``RAY_ADDRESS`` when that is set; ``--ray ADDRESS`` joins that cluster (``auto``, ``HOST:PORT``);
``--ray local`` always starts one. Without ``--ray`` the command is the single-process ingest.

**The plan.** The inputs (sorted, as the single-process path finds them) are cut into *work units* of about one
shard each: photos in runs of ``--shard-samples``; videos and frame folders packed in order until their
estimated clips (duration x ``--fps`` / ``--max-clip-frames``, from the container header or the frame count) or
bytes reach a shard. The plan depends only on the inputs (names, sizes) and the settings, never on the cluster,
so a re-run maps to the same units; its hash is the ``plan_id``. Sample keys are fixed by the plan too (the
single-process keys; where two inputs slug to one key, the later gets ``-2``), so tasks never collide.

**One task per unit** runs the single-process :class:`data_shards.ingest.Ingestor` on its inputs and publishes
WHOLE shards to the dataset URL as ``shard-<plan_id>-u<unit>-<attempt>-<k>.tar`` (+ DALI ``.idx``), then records
them (name, samples, frames, bytes, sha256), its counts and its failed inputs in a done-marker
``.ingest-<plan_id>/unit-<unit>.json``, created only if absent: the first attempt to finish owns the unit and a
duplicate attempt removes its own shards. An input that fails (unreadable or undecodable video, a photo without
a face, an unexpected error) is counted by reason and listed; it never fails the job.

**Kill-safe, resumable.** A worker killed mid-unit leaves at most shards no marker lists: Ray retries the task
(``--max-retries``), or a re-run redoes the unit. A re-run (after a crash, Ctrl-C or failed units) skips every
unit whose marker and shards are there. The manifest is written once, last, when every unit is done, with the
compare-and-swap of :mod:`data_shards.write` (``write_id`` = ``plan_id``); then the shards of the version it
replaced, the unlisted shards of killed attempts and the markers are removed. A re-run after that commit finds
its ``plan_id`` committed and does nothing.

Credentials: the S3 variables reach a joined cluster's workers in the job's runtime environment (as
``launch/ray_pretrain.py`` does), never in a task's arguments, the command line or the log. Input paths must be
readable from every node (a shared filesystem) when the cluster has several.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from common.ray_jobs import STORE_ENV
from data_shards import ingest, store
from data_shards.faces import FaceAligner, FaceConfig, FaceModelError
from data_shards.manifest import MANIFEST_NAME, ShardEntry, build_manifest
from data_shards.read import SkipCounter

log = logging.getLogger("data_shards.ray_ingest")

PLAN_VERSION = 1
MAX_RETRIES = 3  # Ray re-runs a unit whose worker died this many times; a re-run of the command does the rest
JPEG_BYTES_PER_PIXEL = 0.3  # plan estimate: a 128 px face crop at quality 90 is ~4-5 KB
# What a joined cluster's workers need that they do not inherit from this process (credentials included).
FORWARD_ENV = (
    "OMP_NUM_THREADS",
    *STORE_ENV,
)


# ------------------------------------------------------------------------------------------------ plan


@dataclass
class WorkUnit:
    index: int
    sources: list[ingest.Source] = field(default_factory=list)  # --videos
    images: list[str] = field(default_factory=list)  # --images: paths relative to the root
    keys: list[str] = field(default_factory=list)  # key stem per source / sample key per image

    def inputs(self) -> list[str]:
        return [s.name for s in self.sources] or list(self.images)


@dataclass
class Plan:
    kind: str  # "clips" | "frames"
    root: str  # absolute input root
    plan_id: str
    units: list[WorkUnit]

    @property
    def marker_dir(self) -> str:
        return f".ingest-{self.plan_id}"


def unique_keys(bases: list[str]) -> list[str]:
    """``bases`` made unique in order: a repeat gets ``-2``, ``-3``, ... (the single-process rule)."""
    used: set[str] = set()
    out = []
    for base in bases:
        key, n = base, 2
        while key in used:
            key, n = f"{base}-{n}", n + 1
        used.add(key)
        out.append(key)
    return out


def _video_seconds(path: Path) -> float:
    """Duration from the container header (nothing decoded); 0 when it cannot be read (the task reports why)."""
    try:
        import av

        with av.open(str(path)) as container:
            if container.duration:
                return container.duration / 1e6
            stream = container.streams.video[0]
            return float(stream.duration * stream.time_base) if stream.duration else 0.0
    except Exception:  # noqa: BLE001 - only an estimate; the task counts the unreadable video
        return 0.0


def _source_size(src: ingest.Source) -> tuple[int, int]:
    """(bytes, files) of a source: what makes a changed input a different plan."""
    if src.kind == "video":
        return src.path.stat().st_size, 1
    frames = ingest.list_frames(src.path)
    return sum(p.stat().st_size for p in frames), len(frames)


def _estimate(src: ingest.Source, cfg: ingest.IngestConfig) -> tuple[int, int]:
    """(clips, bytes) a source will roughly give: its sampled frames cut into clips of max_clip_frames."""
    if src.kind == "video":
        seconds = _video_seconds(src.path)
    else:
        seconds = len(ingest.list_frames(src.path)) / cfg.frames_fps
    if cfg.max_seconds:
        seconds = min(seconds, cfg.max_seconds)
    sampled = math.ceil(seconds * cfg.fps)
    return math.ceil(sampled / cfg.max_clip_frames), int(sampled * cfg.face.size**2 * JPEG_BYTES_PER_PIXEL)


def _settings(cfg: ingest.IngestConfig) -> dict[str, Any]:
    """The settings that shape the output (the destination and split do not)."""
    return {k: v for k, v in asdict(cfg).items() if k not in ("out", "split")}


def make_plan(cfg: ingest.IngestConfig) -> Plan:
    """Deterministic work units for cfg's inputs; ConfigError when there are none."""
    if cfg.images:
        root = Path(cfg.images).absolute()  # workers may run elsewhere than this working directory
        if not root.exists():
            raise ConfigError(f"--images {root} does not exist: pass a folder of face photos")
        paths = ingest.discover_images(root)
        if not paths:
            exts = ", ".join(f"*{e}" for e in sorted(ingest.IMAGE_EXTS))
            raise ConfigError(f"no images ({exts}, any case) under {root}")
        names = [p.relative_to(root).as_posix() if p != root else p.name for p in paths]
        keys = unique_keys([ingest.image_stem(n) for n in names])
        step = cfg.shard_samples
        units = [
            WorkUnit(i, images=names[s : s + step], keys=keys[s : s + step])
            for i, s in enumerate(range(0, len(names), step))
        ]
        identity = [[n, p.stat().st_size] for n, p in zip(names, paths)]
        kind = "frames"
    else:
        root = Path(cfg.videos).absolute()
        if not root.exists():
            raise ConfigError(f"--videos {root} does not exist: pass a folder of videos or frame folders")
        sources = ingest.discover_sources(root)
        if not sources:
            raise ConfigError(
                f"no videos ({', '.join(sorted(ingest.VIDEO_EXTS))}) or frame folders (*.jpg/*.png) under {root}"
            )
        keys = unique_keys([ingest.source_stem(s) for s in sources])
        units, current, clips, size = [], WorkUnit(0), 0, 0
        for src, key in zip(sources, keys):
            current.sources.append(src)
            current.keys.append(key)
            est_clips, est_bytes = _estimate(src, cfg)
            clips, size = clips + est_clips, size + est_bytes
            if clips >= cfg.shard_samples or size >= cfg.shard_bytes:
                units.append(current)
                current, clips, size = WorkUnit(len(units)), 0, 0
        if current.sources:
            units.append(current)
        identity = [[s.kind, s.name, *_source_size(s)] for s in sources]
        kind = "clips"
    doc = {
        "version": PLAN_VERSION,
        "kind": kind,
        "settings": _settings(cfg),
        "inputs": identity,
        "units": [u.inputs() for u in units],
    }
    plan_id = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]
    return Plan(kind, str(root), plan_id, units)


# --------------------------------------------------------------------------------------- unit (task)


class TarStream:
    """The members ``webdataset.TarWriter(encoder=False, mtime=...)`` writes (sorted, mode 0444, user and group
    ``bigdata``), without importing webdataset: its import (torch) cost each new Ray worker ~1 s."""

    def __init__(self, fileobj, mtime: int) -> None:
        import tarfile

        self._tarfile, self._mtime = tarfile, mtime
        self._tar = tarfile.open(fileobj=fileobj, mode="w|")  # noqa: SIM115 - closed in close()

    def write(self, sample: dict[str, Any]) -> None:
        import io

        key = sample["__key__"]
        for name in sorted(k for k in sample if not k.startswith("_")):
            info = self._tarfile.TarInfo(f"{key}.{name}")
            info.size, info.mtime, info.mode = len(sample[name]), self._mtime, 0o444
            info.uname = info.gname = "bigdata"
            self._tar.addfile(info, io.BytesIO(sample[name]))

    def close(self) -> None:
        self._tar.close()


class UnitWriter:
    """Whole shards of one unit, published under the names given; no manifest (the driver writes that)."""

    def __init__(self, url: str, kind: str, stem: str, max_samples: int, max_bytes: int) -> None:
        self.url, self.kind, self.stem = url, kind, stem
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.skips = SkipCounter(log_first=0)  # the ingestor names each bad input itself
        self.shards: list[ShardEntry] = []
        self.keys: list[str] = []
        self.identities: set[str] = set()
        self.published: list[str] = []
        self._tmp = Path(tempfile.mkdtemp(prefix="ingest-unit-"))
        self._tar = self._file = None
        self._samples = self._frames = self._bytes = 0

    def _name(self) -> str:
        return f"{self.stem}-{len(self.shards):03d}.tar"

    def write(self, key: str, jpegs, meta: dict) -> None:
        from data_shards.write import sample_members

        sample, frames, size = sample_members(self.kind, key, jpegs, meta)
        if self._tar is not None and (
            self._samples >= self.max_samples or self._bytes + size > self.max_bytes
        ):
            self._finish()
        if self._tar is None:
            self._file = open(self._tmp / self._name(), "wb")  # noqa: SIM115 - closed in _finish/abort
            self._tar = TarStream(self._file, mtime=int(time.time()))
            self._samples = self._frames = self._bytes = 0
        self._tar.write(sample)
        self.keys.append(key)
        if meta.get("identity_id") is not None:
            self.identities.add(str(meta["identity_id"]))
        self._samples, self._frames, self._bytes = (
            self._samples + 1,
            self._frames + frames,
            self._bytes + size,
        )

    def skip(self, reason: str, detail: str = "") -> None:
        self.skips(reason, detail)

    def _finish(self) -> None:
        from data_shards.dali_index import write_index
        from data_shards.write import _sha256, index_url

        name = self._name()
        path = self._tmp / name
        self._tar.close()
        self._file.close()
        self._tar = self._file = None
        entry = ShardEntry(name, self._samples, self._frames, path.stat().st_size, _sha256(path))
        url = store.join(self.url, name)
        self.published += [index_url(url), url]  # before the upload: a failed one is cleaned up too
        index = write_index(path, path.with_suffix(".idx"))
        store.put_file(index, index_url(url), move=True)
        store.put_file(path, url, move=True)
        self.shards.append(entry)

    def close(self) -> list[ShardEntry]:
        try:
            if self._tar is not None:
                self._finish()
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)
        return self.shards

    def abort(self) -> None:
        """Drop the shard in progress and remove the shards published."""
        if self._tar is not None:
            try:
                self._tar.close()
                self._file.close()
            except Exception:  # noqa: BLE001 - aborting anyway
                pass
        self.remove_published()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def remove_published(self) -> None:
        from data_shards.write import _remove_all

        _remove_all(list(reversed(self.published)), "an unfinished or duplicate attempt of a work unit")
        self.published = []


@dataclass
class RunSpec:
    """What every task shares (put in the object store once): the config carries no credentials."""

    cfg: ingest.IngestConfig
    kind: str
    root: str
    plan_id: str
    marker_dir: str


def marker_url(spec_url: str, marker_dir: str, index: int) -> str:
    return store.join(store.join(spec_url, marker_dir), f"unit-{index:06d}.json")


def read_marker(url: str) -> dict | None:
    try:
        return json.loads(store.read_bytes(url))
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None  # a torn marker (never written by us: markers are created whole) means "not done"


def create_marker(url: str, payload: bytes) -> bool:
    """Publish ``payload`` at ``url`` only if nothing is there (atomic either way); True if this call did."""
    from data_shards.write import _create_only

    if store.is_s3(url):
        return _create_only(payload, url)  # If-None-Match: * (a store that ignores it: last attempt wins)
    dest = Path(url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_bytes(payload)
    try:
        os.link(tmp, dest)  # fails if dest exists; readers never see a partial marker
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


_ALIGNERS: dict[str, FaceAligner] = {}


def _aligner(face: FaceConfig) -> FaceAligner:
    """One FaceAligner per worker process and face config (the dlib model loads once, not per unit)."""
    key = json.dumps(asdict(face), sort_keys=True)
    if key not in _ALIGNERS:
        _ALIGNERS[key] = FaceAligner(face)
    return _ALIGNERS[key]


def ingest_unit(unit: WorkUnit, spec: RunSpec) -> dict:
    """Ray task body: ingest one unit into whole shards, then create its done-marker; returns the marker."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
    cfg = spec.cfg
    url = marker_url(cfg.out, spec.marker_dir, unit.index)
    done = read_marker(url)
    if done is not None:
        return done
    attempt = secrets.token_hex(3)
    writer = UnitWriter(
        cfg.out,
        spec.kind,
        f"shard-{spec.plan_id}-u{unit.index:06d}-{attempt}",
        cfg.shard_samples,
        cfg.shard_bytes,
    )
    started = time.perf_counter()
    try:
        stems = dict(zip([s.name for s in unit.sources], unit.keys))
        ingestor = ingest.Ingestor(cfg, writer, _aligner(cfg.face), stems=stems)
        root = Path(spec.root)
        for i, name in enumerate(unit.inputs()):
            try:
                if unit.sources:
                    ingestor.ingest_source(unit.sources[i])
                else:
                    path = root / name if root.is_dir() else root
                    ingestor.ingest_image(root, path, unit.keys[i])
            except store.StoreError:
                raise  # the destination, not this input: the unit fails (Ray retries it, a re-run redoes it)
            except Exception as err:  # noqa: BLE001 - one input's bug or crash never fails the unit
                detail = f"{name}: {type(err).__name__}: {err}"
                log.warning("input failed: %s", detail)
                ingestor.stats["skipped.error"] += 1
                writer.skip("error", detail)
                ingestor.failed.append((name, f"error: {type(err).__name__}: {err}"))
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    marker = {
        "plan_id": spec.plan_id,
        "unit": unit.index,
        "attempt": attempt,
        "worker_pid": os.getpid(),
        "seconds": round(time.perf_counter() - started, 3),
        "inputs": unit.inputs(),
        "shards": [asdict(s) for s in shards],
        "keys": writer.keys,
        "identities": sorted(writer.identities),
        "stats": dict(ingestor.stats),
        "skipped": writer.skips.as_dict(),
        "failed": [[name, reason] for name, reason in ingestor.failed],
    }
    if create_marker(url, json.dumps(marker).encode()):
        return marker
    writer.remove_published()  # another attempt finished this unit first: its shards are the ones recorded
    return read_marker(url) or marker


# ---------------------------------------------------------------------------------------------- driver


@dataclass
class RayIngestOptions:
    address: str = ""  # "" : RAY_ADDRESS if set, else a local cluster; "local"; or a cluster address
    workers: int = 0  # at most this many units at once (0: the cluster's CPUs); a local cluster's CPUs
    max_retries: int = MAX_RETRIES
    json_path: str = ""
    progress: bool = True


def _job_env_vars() -> set[str]:
    """Variables a submitted job's runtime environment sets already (Ray refuses to set one twice)."""
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    return set(((job.get("runtime_env") or {}).get("env_vars") or {}).keys())


def connect(options: RayIngestOptions) -> bool:
    """Join or start Ray; True when this call started (or connected) it, so the caller shuts it down."""
    import ray

    from common.ray_jobs import ray_env, refresh_auth_mode

    if ray.is_initialized():
        return False
    ray_env()
    address = options.address or os.environ.get("RAY_ADDRESS", "")
    if address in ("", "local"):
        ray.init(
            address="local",
            num_cpus=options.workers or os.cpu_count() or 1,
            num_gpus=0,
            include_dashboard=False,
            object_store_memory=100 * 2**20,
            _node_ip_address="127.0.0.1",
            logging_level="WARNING",
        )
        return True
    refresh_auth_mode()
    taken = _job_env_vars()
    env = {k: os.environ[k] for k in FORWARD_ENV if k in os.environ and k not in taken}
    ray.init(address=address, runtime_env={"env_vars": env}, logging_level="WARNING")
    return True


def load_done(url: str, plan: Plan) -> dict[int, dict]:
    """Markers of units already done whose shards are all still there (else the unit is redone)."""
    folder = store.join(url, plan.marker_dir)
    done: dict[int, dict] = {}
    for name in store.list_dir(folder):
        if not (name.startswith("unit-") and name.endswith(".json")):
            continue
        marker = read_marker(store.join(folder, name))
        if not marker or marker.get("plan_id") != plan.plan_id:
            store.remove(store.join(folder, name))  # unreadable: the unit is done again
            continue
        if all(store.exists(store.join(url, s["name"])) for s in marker["shards"]):
            done[int(marker["unit"])] = marker
        else:
            log.warning(
                "unit %s: a shard its marker lists is missing; the unit is done again", marker["unit"]
            )
            store.remove(store.join(folder, name))
    return done


@dataclass
class Outcome:
    markers: dict[int, dict]
    failed_units: dict[int, str]
    seconds: float
    interrupted: bool = False


def run_units(plan: Plan, cfg: ingest.IngestConfig, todo: list[WorkUnit], options: RayIngestOptions,
              done: dict[int, dict]) -> Outcome:  # fmt: skip
    """Submit ``todo`` (at most ``workers`` in flight), a progress bar over finished units; failures kept."""
    import ray
    from tqdm import tqdm

    task = ray.remote(ingest_unit).options(
        num_cpus=1, max_retries=options.max_retries, retry_exceptions=[OSError]
    )
    spec = ray.put(RunSpec(cfg, plan.kind, plan.root, plan.plan_id, plan.marker_dir))
    limit = options.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    markers, failed, pending = dict(done), {}, {}
    queue = list(todo)
    bar = tqdm(
        total=len(plan.units), initial=len(done), unit="shard", desc="ingest", disable=not options.progress
    )
    started = time.monotonic()
    frames = 0
    try:
        while queue or pending:
            while queue and len(pending) < limit:
                unit = queue.pop(0)
                pending[task.remote(unit, spec)] = unit
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                unit = pending.pop(ref)
                try:
                    marker = ray.get(ref)
                except Exception as err:  # noqa: BLE001 - a unit that failed every retry; the rest go on
                    failed[unit.index] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}"
                    log.warning("unit %d failed: %s", unit.index, failed[unit.index])
                else:
                    markers[unit.index] = marker
                    frames += _work(marker)
                bar.update(1)
                bar.set_postfix_str(f"{frames / max(time.monotonic() - started, 1e-9):.1f} frames/s")
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        bar.close()
        return Outcome(markers, failed, time.monotonic() - started, interrupted=True)
    bar.close()
    return Outcome(markers, failed, time.monotonic() - started)


def _work(marker: dict) -> int:
    """Frames a unit ran face detection on (sampled video frames, or photos)."""
    stats = marker["stats"]
    return int(stats.get("frames_sampled", 0)) + int(stats.get("images", 0))


def _totals(markers: dict[int, dict]) -> tuple[Counter, set[str], dict[str, int], list[list[str]]]:
    stats: Counter = Counter()
    identities: set[str] = set()
    skipped: Counter = Counter()
    failed: list[list[str]] = []
    for index in sorted(markers):
        marker = markers[index]
        stats.update(marker["stats"])
        identities.update(marker["identities"])
        skipped.update(marker["skipped"])
        failed += marker["failed"]
    return stats, identities, dict(skipped), failed


def commit(plan: Plan, cfg: ingest.IngestConfig, markers: dict[int, dict], base, identities: int,
           skipped: dict[str, int]) -> dict:  # fmt: skip
    """Write the manifest (compare-and-swap against ``base``), then remove the replaced version's shards, the
    unlisted shards of this plan's killed attempts and the markers."""
    from data_shards.write import _commit, _conditional_writes, _remove_all, index_url

    shards = [ShardEntry(**s) for i in sorted(markers) for s in markers[i]["shards"]]
    keys = Counter(k for m in markers.values() for k in m["keys"])
    repeated = sorted(k for k, n in keys.items() if n > 1)
    if repeated:  # the plan assigns keys, so this is a bug, never something to commit
        raise RuntimeError(f"sample keys written by two units: {repeated[:5]}; nothing was committed")
    generator = {
        **ingest.generator_of(cfg),
        "distributed": {"plan_id": plan.plan_id, "units": len(plan.units)},
    }
    manifest = build_manifest(
        plan.kind, cfg.split, generator, shards, identities=identities, skipped=skipped, write_id=plan.plan_id
    )
    payload = json.dumps(manifest, indent=1).encode("utf-8")
    _commit(cfg.out, payload, base, plan.plan_id, _conditional_writes(cfg.out))
    listed = {s.name for s in shards}
    if base is not None and base.write_id != plan.plan_id:
        from data_shards.write import PLAIN_CLAIM

        old = sorted((n for n in base.shard_names if n not in listed), key=lambda n: n == PLAIN_CLAIM)
        _remove_all([index_url(store.join(cfg.out, n)) for n in old if n.endswith(".tar")], "replaced")
        _remove_all([store.join(cfg.out, n) for n in old], "replaced by a new version")
    mine = (f"shard-{plan.plan_id}-", f".shard-{plan.plan_id}-")
    orphans = [
        n for n in store.list_dir(cfg.out)
        if n.startswith(mine) and n not in listed and n.removesuffix(".idx") + ".tar" not in listed
    ]  # fmt: skip
    _remove_all([store.join(cfg.out, n) for n in orphans], "an unfinished attempt of a work unit")
    folder = store.join(cfg.out, plan.marker_dir)
    _remove_all([store.join(folder, n) for n in store.list_dir(folder)], "ingest finished")
    if store.is_s3(folder):
        _remove_all([folder], "ingest finished")  # stores with real folders (SeaweedFS) keep an empty one
    else:
        shutil.rmtree(folder, ignore_errors=True)
    return manifest


def summary_lines(
    plan: Plan, stats: Counter, identities: int, failed: list[list[str]], seconds: float
) -> list[str]:
    if plan.kind == "clips":
        lines = ingest.format_summary(stats, identities, seconds).splitlines()
    else:
        lines = [
            f"ingest: {stats['faces']} face images ({identities} identities) from {stats['images']} image files; "
            f"{seconds:.1f} s"
        ]
        skipped = {k.split(".", 1)[1]: v for k, v in sorted(stats.items()) if k.startswith("skipped.")}
        lines.append("skipped: " + (", ".join(f"{k}={v}" for k, v in skipped.items()) or "none"))
    for name, reason in failed[: ingest.SKIPPED_LISTED]:
        lines.append(f"  not ingested ({reason}): {name}")
    if len(failed) > ingest.SKIPPED_LISTED:
        lines.append(
            f"  ... and {len(failed) - ingest.SKIPPED_LISTED} more (all in --json, and the log above)"
        )
    return lines


def run_distributed(cfg: ingest.IngestConfig, options: RayIngestOptions) -> int:
    """The ``--ray`` command: 0 committed, 1 units failed / nothing ingested / interrupted (re-run to finish),
    2 bad input, destination or face model."""
    from data_shards.write import ConcurrentWriteError, _committed_version

    try:
        cfg.validate()
        plan = make_plan(cfg)
        store.check_access(cfg.out, write=True)
        FaceAligner(cfg.face)  # the model is there and loads, before any task starts
        base = _committed_version(cfg.out)
    except (ConfigError, store.StoreError, FaceModelError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report: dict[str, Any] = {
        "mode": "ray",
        "out": cfg.out,
        "kind": plan.kind,
        "plan_id": plan.plan_id,
        "units": len(plan.units),
    }
    if base is not None and base.write_id == plan.plan_id:
        print(f"ingest: {cfg.out} already holds this plan's dataset (write_id {plan.plan_id}): nothing to do",
              file=sys.stderr)  # fmt: skip
        _write_json(options.json_path, {**report, "status": "already_committed", "committed": True})
        return 0
    try:
        done = load_done(cfg.out, plan)
        store.put_bytes(
            json.dumps({"plan_id": plan.plan_id, "units": [u.inputs() for u in plan.units]}).encode(),
            store.join(store.join(cfg.out, plan.marker_dir), "plan.json"),
        )
    except store.StoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    todo = [u for u in plan.units if u.index not in done]
    print(
        f"ingest: plan {plan.plan_id}: {len(plan.units)} work units ({plan.kind}), {len(done)} already done, "
        f"{len(todo)} to run",
        file=sys.stderr,
    )
    started_ray = False
    outcome = Outcome(dict(done), {}, 0.0)
    if todo:
        started_ray = connect(options)
        try:
            outcome = run_units(plan, cfg, todo, options, done)
        finally:
            if started_ray:
                import ray

                ray.shutdown()
    stats, identities, skipped, failed = _totals(outcome.markers)
    ran = [m for i, m in outcome.markers.items() if i not in done]
    work = sum(_work(m) for m in ran)
    rate = work / outcome.seconds if outcome.seconds > 0 else 0.0
    failed += [[name, "task_failed"] for i in outcome.failed_units for name in plan.units[i].inputs()]
    for line in summary_lines(plan, stats, len(identities), failed, outcome.seconds):
        print(line, file=sys.stderr)
    what = "frames" if plan.kind == "clips" else "images"
    print(f"throughput: {work} {what} through face detection in {outcome.seconds:.1f} s = {rate:.1f} {what}/s "
          f"({len(ran)} units run here)", file=sys.stderr)  # fmt: skip
    report.update(
        units_done_before=len(done),
        units_run=len(ran),
        units_failed={str(i): why for i, why in sorted(outcome.failed_units.items())},
        stats=dict(sorted(stats.items())),
        identities=len(identities),
        failed_inputs=[{"input": n, "reason": r} for n, r in failed],
        seconds=round(outcome.seconds, 3),
        work=work,
        per_s=round(rate, 2),
        committed=False,
    )
    samples = sum(s["samples"] for m in outcome.markers.values() for s in m["shards"])
    if outcome.interrupted or outcome.failed_units:
        why = "interrupted" if outcome.interrupted else f"{len(outcome.failed_units)} work units failed"
        print(f"error: {why}; nothing committed. The {len(outcome.markers)} finished units are kept: re-run the "
              "same command to finish the rest", file=sys.stderr)  # fmt: skip
        _write_json(
            options.json_path, {**report, "status": "interrupted" if outcome.interrupted else "failed"}
        )
        return 130 if outcome.interrupted else 1
    if not samples:
        print(f"error: no {'clip' if plan.kind == 'clips' else 'face image'} was written; nothing committed",
              file=sys.stderr)  # fmt: skip
        _write_json(options.json_path, {**report, "status": "empty"})
        return 1
    try:
        manifest = commit(plan, cfg, outcome.markers, base, len(identities), skipped)
    except ConcurrentWriteError as err:
        print(f"error: {err}", file=sys.stderr)
        _write_json(options.json_path, {**report, "status": "conflict"})
        return 1
    totals = manifest["totals"]
    print(f"committed {cfg.out}/{MANIFEST_NAME}: {totals['samples']} samples in {totals['shards']} shards",
          file=sys.stderr)  # fmt: skip
    _write_json(options.json_path, {**report, "status": "committed", "committed": True, "totals": totals})
    return 0


def _write_json(path: str, doc: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(doc, indent=1) + "\n")


# ------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """The ingest options plus the distributed ones."""
    p = ingest.build_parser()
    p.description = (p.description or "") + " With --ray: fanned out as Ray tasks, one per shard-sized unit."
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run on Ray: alone, RAY_ADDRESS if set else a local cluster started for the job; or a cluster "
        "address (auto, HOST:PORT); 'local' always starts one",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="--ray: units at once (and a local cluster's CPUs); 0: all CPUs",
    )
    p.add_argument(
        "--max-retries", type=int, default=MAX_RETRIES, help="--ray: re-runs of a unit whose worker died"
    )
    p.add_argument(
        "--json", default="", help="--ray: write the summary (counts, failed inputs, throughput) here"
    )
    p.add_argument("--no-progress", action="store_true", help="--ray: no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m data_shards ingest``: the single-process ingest, or with ``--ray`` the distributed one."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ingest"]:
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    if args.ray is None:
        extra = [a for a in ("--workers", "--max-retries", "--json", "--no-progress") if _given(argv, a)]
        if extra:
            print(f"error: {', '.join(extra)} only apply with --ray", file=sys.stderr)
            return 2
        return ingest.main(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.workers < 0 or args.max_retries < 0:
        print("error: --workers and --max-retries must be >= 0", file=sys.stderr)
        return 2
    options = RayIngestOptions(
        address=args.ray,
        workers=args.workers,
        max_retries=args.max_retries,
        json_path=args.json,
        progress=not args.no_progress,
    )
    return run_distributed(ingest.config_from_args(args), options)


def _given(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)

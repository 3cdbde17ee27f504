"""The training program: a :class:`Trainer` that runs the contrastive objective under DeepSpeed.

Named steps, in order: the preflight checks with this rank's dataset opened once (``pretrain/preflight.py``),
:meth:`Trainer.init_distributed`, :meth:`Trainer.build_data`, :meth:`Trainer.build_model`
(``deepspeed.initialize``), :meth:`Trainer.maybe_resume`, then :meth:`Trainer.train` (the loop) calling
:meth:`Trainer.next_step` -> :meth:`Trainer.train_step` per batch. The model and the loss are plain modules;
DeepSpeed appears only here (engine, optimiser, checkpoints) and in ``pretrain/ds_config.py``; collectives only in
``pretrain/distributed.py``.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from common.configio import save_config
from pretrain import distributed, fault_injection, preflight, sweep
from pretrain.checkpoint import Checkpointer, StopSignal
from pretrain.collapse import CollapseDetector
from pretrain.config import PretrainConfig, resolve_global_batch, resolve_input_workers
from pretrain.dataset import open_dataset
from pretrain.ds_config import lr_scheduler_factory, resolve_ds_config, save_resolved, write_monitor_loss
from pretrain.loss import DistributedInfoNCE, LossOutput
from pretrain.model import ContrastiveEncoder, compile_in_place, save_backbone
from pretrain.pipelines import Batch, make_batch_pipeline

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf and ``nan_policy`` is ``stop``; the message names the step and the fix.

    A training fault, not a setting the user got wrong: it is no :class:`common.errors.UserError`.
    """


@dataclass
class StepResult:
    loss: torch.Tensor  # this rank's loss (detached); the logged value is its mean over ranks
    out: LossOutput
    images: int  # images this rank processed
    lr: float  # learning rate this step used


class Trainer:
    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.step = 0  # optimiser steps completed
        self.epoch = 0
        self.resumed_from: Path | None = None
        self.nonfinite_skipped = 0  # steps skipped for a NaN/inf loss (nan_policy=skip)
        self.collapse = CollapseDetector(cfg.collapse)  # positive top-1 stuck at chance: one clear warning
        # Credentials, store retry policy, config vs manifest: before any rank waits for the others.
        preflight.configure_store(cfg)
        self.dataset = open_dataset(cfg.data.url)  # once per rank: access checked, manifest read
        preflight.check(cfg, self.dataset)
        self.init_distributed()
        self.cfg = resolve_global_batch(cfg, self.world_size)  # data.global_batch_clips -> clips per rank
        self.build_data()
        self.build_model()
        self.checkpointer = Checkpointer(self.run_dir, cfg.checkpoint.keep_last, cfg.checkpoint.mirror_url)
        self.metrics = None
        self.maybe_resume()

    # ------------------------------------------------------------------ setup
    def init_distributed(self) -> None:
        cfg = self.cfg
        want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                "config key 'device': cuda requested but CUDA is not available; use device=cpu"
            )
        if distributed.get_local_rank() == 0:  # one rank per machine: buffers of runs killed before
            sweep.sweep_shm_buffers()
        info = distributed.init_distributed("nccl" if want_cuda else "gloo", timeout_s=cfg.dist_timeout_s)
        if info.backend == "none":
            # DeepSpeed insists on a process group even for one process; a plain `python` start gets a
            # one-rank group on a free loopback port.
            import deepspeed

            distributed.single_process_env()
            deepspeed.init_distributed("nccl" if want_cuda else "gloo", auto_mpi_discovery=False)
        self.rank, self.world_size = distributed.get_rank(), distributed.get_world_size()
        self.device = torch.device("cuda", distributed.get_local_rank()) if want_cuda else torch.device("cpu")
        if want_cuda:
            torch.backends.cudnn.benchmark = True
        if distributed.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
        distributed.barrier()

    def build_data(self) -> None:
        # data.num_workers=auto -> a number for this host, recorded in the run's config.yaml
        self.cfg = resolve_input_workers(self.cfg, self.device.type)
        # data.pipeline picks torch | dali | torchvision; all yield the same Batch through one interface.
        self.batches = make_batch_pipeline(
            self.cfg, self.rank, self.world_size, self.device, dataset=self.dataset
        )
        self.total_steps = self.cfg.max_steps or self.batches.total_steps(self.cfg.epochs)

    def build_model(self) -> None:
        import deepspeed

        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        # model.channels_last: the views arrive channels_last and convolutions follow their input's format.
        # The weights stay contiguous: DeepSpeed broadcasts/flattens parameters as plain byte views, which
        # channels_last weights are not.
        model = ContrastiveEncoder(cfg.model)
        if cfg.model.compile:  # in place: state_dict keys, hence checkpoints, stay those of the eager model
            compile_in_place(model)
        self.loss_fn = DistributedInfoNCE(cfg.loss)
        # The project's DeepSpeed keys merged with the user's --deepspeed_config JSON (monitors, profilers...).
        self.ds_config = resolve_ds_config(cfg, self.world_size)
        if distributed.is_main():  # next to config.yaml: what DeepSpeed really ran with
            save_resolved(self.ds_config, self.run_dir / "ds_config.json")
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=self.ds_config,
            lr_scheduler=lr_scheduler_factory(cfg, self.total_steps),
            dist_init_required=False,
        )
        self.set_train_mode()

    def set_train_mode(self) -> None:
        self.engine.train()
        if self.cfg.freeze_bn_stats:
            # Running-stat BatchNorm couples no rows of a batch, so a rank's forward equals its slice of the
            # single-process forward (used by the exactness test); batch statistics would differ per rank.
            for module in self.engine.module.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def maybe_resume(self) -> None:
        path = self.checkpointer.resolve(self.cfg.resume)
        if path is None:
            if distributed.is_main():
                _set_aside_metrics(self.run_dir / "metrics.jsonl")
            return
        state = self.checkpointer.load(self.engine, path, self.world_size, int(self.cfg.zero_stage))
        self.step, self.epoch = state["step"], state["epoch"]
        self.resumed_from = path
        self.batches.load_state_dict(state["data"])
        self.set_train_mode()
        if distributed.is_main():
            _truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
            log.info("resumed from %s at step %d (epoch %d)", path, self.step, self.epoch)

    # ------------------------------------------------------------------ one step
    def forward_loss(self, batch: Batch) -> LossOutput:
        images = batch.images
        precision = self.cfg.precision
        if precision == "bf16_weights":
            images = images.to(torch.bfloat16)
        # bf16_autocast: the weights stay fp32 and autocast runs convolutions/matmuls in bf16 (BatchNorm in fp32).
        with torch.autocast(self.device.type, torch.bfloat16, enabled=precision == "bf16_autocast"):
            z = self.engine(images)
        z = z.float()  # the loss runs in fp32 whatever the model precision, outside autocast
        return self.loss_fn(z, batch.positive_index, batch.group_id, batch.descriptors, batch.donor_row)

    def train_step(self, batch: Batch) -> StepResult:
        lr = self.current_lr()  # engine.step() advances the schedule: read the LR this step uses first
        out = self.forward_loss(batch)
        if fault_injection.before_step(self.step + 1):  # fault suite only: NaN loss, slow steps
            out.loss = out.loss * float("nan")
        # Every rank takes the same branch, or the ranks that step would wait for the others in the all-reduce.
        if not distributed.all_ranks(bool(torch.isfinite(out.loss.detach()).all())):
            return self._nonfinite_step(out, batch, lr)
        self.engine.backward(out.loss)
        self.engine.step()  # averages gradients over ranks, clips, Adam, LR schedule
        write_monitor_loss(self.engine, out.loss)  # DeepSpeed's monitors, when the JSON enables one
        return StepResult(out.loss.detach(), out, batch.images.shape[0], lr)

    def _nonfinite_step(self, out: LossOutput, batch: Batch, lr: float) -> StepResult:
        """NaN/inf loss on some rank: skip the step (no backward, no optimiser step) or stop, per nan_policy."""
        where = f"step {self.step + 1} (epoch {batch.epoch}, batch {batch.index})"
        if self.cfg.nan_policy == "stop":
            latest = self.checkpointer.latest()
            raise NonFiniteLossError(
                f"non-finite loss ({out.loss.item()}) at {where}: stopping (nan_policy=stop). The last good "
                f"checkpoint is {latest or 'none (no checkpoint was written yet)'}; lower optim.lr or set "
                "optim.grad_clip, or set nan_policy=skip, then rerun with resume=auto"
            )
        self.nonfinite_skipped += 1
        log.warning(
            "non-finite loss at %s: step skipped (%d so far, nan_policy=skip)", where, self.nonfinite_skipped
        )
        return StepResult(out.loss.detach(), out, batch.images.shape[0], lr)

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        t0 = time.perf_counter()
        path = self.checkpointer.save(
            self.engine,
            self.step,
            self.epoch,
            {"data": self.batches.state_dict()},
            int(self.cfg.zero_stage),
        )
        if self.metrics is not None:
            self.metrics.observe_checkpoint(time.perf_counter() - t0)
        return path

    def _should_stop(self, stop: StopSignal | None) -> bool:
        # One rank may get the signal first (the deepspeed launcher terminates ranks one by one): agree.
        return distributed.any_rank(stop is not None and stop.received is not None)

    # ------------------------------------------------------------------ the loop
    def train(self) -> str:
        """Run to ``max_steps`` (or ``stop_at_step`` / a signal). Returns finished|stopped|signal."""
        cfg = self.cfg
        main = distributed.is_main()
        if main:
            save_config(cfg, self.run_dir / "config.yaml")
        self._start_metrics()
        stop = StopSignal().install() if cfg.checkpoint.on_signal else None
        last = min(self.total_steps, cfg.stop_at_step or self.total_steps)
        progress = _progress(self.total_steps, self.step, main)
        metrics_file = open(self.run_dir / "metrics.jsonl", "a") if main else None  # noqa: SIM115
        window = _Window()
        status = "finished"
        saved_at = self.step if self.resumed_from is not None else -1  # that checkpoint exists already
        batches = iter(self.batches)
        try:
            while self.step < last:
                result = self.next_step(batches, window)
                stopping = self._should_stop(stop)
                if self.step % cfg.log_every == 0 or self.step == last or stopping:
                    self._log_step(result, window, metrics_file, progress)
                    window = _Window()
                if stopping:
                    status = "signal"
                    break
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                    saved_at = self.step
            if status == "finished" and self.step < self.total_steps:
                status = "stopped"
            self._finish(status, saved_at)
        finally:
            if stop is not None:
                stop.uninstall()
            if metrics_file is not None:
                metrics_file.close()
            progress.close()
            self.batches.close()
            if self.metrics is not None:
                self._sync_counters()
                self.metrics.close(self._metrics_sd)
        if main:
            log.info(
                "training %s at step %d/%d; run dir %s", status, self.step, self.total_steps, self.run_dir
            )
        return status

    def next_step(self, batches, window: _Window) -> StepResult:
        """One optimiser step of the loop: fetch the next batch, train on it, count it."""
        t0 = time.perf_counter()
        batch = next(batches)
        t_data = time.perf_counter() - t0
        result = self.train_step(batch)
        self.step += 1
        self.epoch = batch.epoch
        if self.device.type == "cuda" and self.step % self.cfg.log_every == 0:
            torch.cuda.synchronize(self.device)  # logging steps only: the step time then includes the device
        step_s = time.perf_counter() - t0
        window.add(step_s, t_data, batch.wait_s, result.images, batch.clips)
        if self.metrics is not None:  # host-side numbers only: no device sync per step
            self.metrics.observe_step(
                step_seconds=step_s,
                data_wait_seconds=batch.wait_s,
                allgather_seconds=result.out.gather_seconds,
                clips=batch.clips,
                images=result.images,
                lr=result.lr,
            )
        return result

    def _finish(self, status: str, saved_at: int) -> None:
        """The last checkpoint (unless this step has one) and, for a run not cut by a signal, the backbone."""
        if saved_at != self.step:
            self.save_checkpoint()
        if status != "signal" and distributed.is_main():
            save_backbone(self.engine.module.backbone, self.run_dir / "backbone.pt")
        distributed.barrier()

    def _start_metrics(self) -> None:
        if not self.cfg.metrics.enabled:
            return
        from pretrain.metrics import TrainMetrics, publish_targets

        local_rank = distributed.get_local_rank()
        run = self.cfg.metrics.run or self.run_dir.resolve().name
        self.metrics = TrainMetrics(self.cfg.metrics, self.rank, local_rank, run)
        self.metrics.start(local_rank)
        # Collective: every rank's host:port -> rank 0 writes metrics.file_sd_dir/RUN.json (None elsewhere).
        self._metrics_sd = publish_targets(self.metrics, True)
        if self._metrics_sd is not None:
            sweep.sweep_file_sd(self._metrics_sd.parent, keep=self._metrics_sd)  # targets of killed runs
            log.info("metrics: exporters listed in %s", self._metrics_sd)

    def _sync_counters(self) -> None:
        """Cumulative input-pipeline counters -> exporter: skipped samples by reason, bytes read."""
        from data_shards.store import bytes_read

        self.metrics.set_skipped(self.batches.skipped())
        self.metrics.set_store_bytes(bytes_read())

    def _log_step(self, result: StepResult, window: _Window, metrics_file, progress) -> None:
        out = result.out
        stats = torch.stack(
            [
                result.loss.float(),
                out.l1.float(),
                out.l2.float(),
                out.positive_top1.float(),
                out.negatives_per_row.float(),
                (out.pick_same_group_rate if out.pick_same_group_rate is not None else out.l2 * 0).float(),
            ]
        ).to(self.device)  # nccl reduces device tensors only
        loss, l1, l2, top1, negs, same = distributed.all_reduce_mean(stats).tolist()
        collapsed = self.collapse.update(self.step, top1, negs)  # the same reduced values on every rank
        # Wall clock since the previous line: the stop-flag all-reduce, logging and checkpoints between steps
        # count too (summed step times alone overstated throughput by ~15% on 2 CPU ranks).
        images_per_s = window.images * self.world_size / max(window.elapsed(), 1e-9)
        wait_fraction = window.wait / max(window.seconds, 1e-9)
        lr = result.lr
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if self.metrics is not None:  # per-step counters are fed in the loop; here the reduced loss terms
            self.metrics.set_losses(
                loss,
                l1,
                l2,
                pick_rate=out.pick_index.numel() / max(out.rows, 1) if out.pick_index is not None else 0.0,
                same_identity_rate=same if out.pick_same_group_rate is not None else None,
            )
            self.metrics.set_health(positive_top1=top1, collapse_suspected=collapsed)
            self._sync_counters()
        if metrics_file is None:
            return
        line = {
            "step": self.step,
            "epoch": self.epoch,
            "loss": loss,
            "l1": l1,
            "l2": l2,
            "lr": lr,
            "images_per_s": images_per_s,
            "data_wait_fraction": wait_fraction,
            "input_prep_fraction": window.prep / max(window.seconds, 1e-9),
            "step_time_s": window.seconds / max(window.steps, 1),
            "positive_top1": top1,
            "collapse_suspected": collapsed,
            "negatives_per_row": negs,
            "pick_same_identity_rate": same if out.pick_same_group_rate is not None else None,
            "peak_memory_bytes": peak,
            "skipped": self.batches.skipped(),
            "nonfinite_skipped": self.nonfinite_skipped,
            "time": time.time(),
        }
        metrics_file.write(json.dumps(line) + "\n")
        metrics_file.flush()
        progress.update(self.step - progress.n)
        progress.set_postfix(
            loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.0f}", wait=f"{wait_fraction:.0%}"
        )


class _Window:
    """Sums over the steps between two metrics lines."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.steps = 0
        self.seconds = self.wait = self.prep = 0.0
        self.images = self.clips = 0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def add(self, seconds: float, data_s: float, wait_s: float, images: int, clips: int) -> None:
        self.steps += 1
        self.seconds += seconds
        self.wait += wait_s  # blocked on the background input threads
        self.prep += max(0.0, data_s - wait_s)  # on-device decode/FaceSwap/augmentation in this thread
        self.images += images
        self.clips += clips


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


def _set_aside_metrics(path: Path) -> None:
    """A fresh run in a run_dir that holds an earlier run's metrics: keep those under another name (a fresh
    run's step 1 must not follow the old run's last line) and say so."""
    if not path.exists() or path.stat().st_size == 0:
        return
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(path.stat().st_mtime))
    kept = path.with_name(f"metrics.{stamp}.jsonl")
    os.replace(path, kept)
    log.warning("fresh run in %s: the earlier run's metrics moved to %s", path.parent, kept.name)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint we resume from (a hard kill loses those steps; they rerun)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    keep = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line) if line.strip() else None
        except ValueError:  # a line torn by a kill mid-write: dropped, the step reruns
            log.warning("%s line %d is not complete JSON (a write cut short): dropped", path, number)
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            keep.append(line)
    if len(keep) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)


def run(cfg: PretrainConfig) -> str:
    """Build a :class:`Trainer` and train; the whole program behind ``launch/pretrain.py``."""
    return Trainer(cfg).train()

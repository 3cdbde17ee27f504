"""Pretraining entry point.

    deepspeed --num_gpus 2 launch/pretrain.py --config launch/configs/smoke.yaml run_dir=runs/x data.url=...
    torchrun --nproc_per_node 2 launch/pretrain.py --config ...
    python launch/pretrain.py --config ...            # one process
    deepspeed --num_gpus 2 launch/pretrain.py --deepspeed --deepspeed_config ds.json --config ...

Everything after ``--config PATH`` is ``key=value`` overrides (see ``pretrain/config.py``). The launchers'
``--local_rank``/``--local-rank`` arguments are accepted and ignored (the rank comes from the environment).
DeepSpeed's own ``--deepspeed``/``--deepspeed_config FILE`` are accepted too: FILE's keys are merged into the
DeepSpeed config the project derives from its config (monitors such as csv_monitor/tensorboard/wandb,
comms_logger, flops_profiler, wall_clock_breakdown...); a key the project derives (batch sizes, optimizer,
zero_optimization.stage, bf16, gradient_clipping...) with another value is an error naming the config key to
change. The resolved DeepSpeed config is saved as RUN_DIR/ds_config.json.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python launch/pretrain.py` from anywhere

from common.configio import load_config  # noqa: E402
from common.errors import ConfigError, UserError  # noqa: E402


class _HelpWithKeys(argparse.Action):
    """``--help``: usage, then every config key with its type, default and meaning.

    The key list is built only when asked for: it imports the config sections (torch among them)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from common.config_doc import keys_help
        from pretrain.config import PretrainConfig

        parser.epilog = (
            "config keys (YAML file or key=value; key (type, default) then meaning):\n"
            + keys_help(PretrainConfig)
        )
        parser.print_help()
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    import deepspeed

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False
    )
    parser.add_argument(
        "-h", "--help", action=_HelpWithKeys, help="show this help and every config key, then exit"
    )
    parser.add_argument(
        "--config", help="YAML file (launch/configs/*.yaml); may name a base file with base: FILE"
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.batch_clips=16")
    # DeepSpeed's conventions: --deepspeed, --deepspeed_config FILE (and the deprecated --deepscale[_config]).
    return deepspeed.add_config_arguments(parser)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """``config``, ``overrides`` and ``deepspeed_config`` (the user's DeepSpeed JSON, or None)."""
    # intermixed: DeepSpeed's options may come before, between or after the key=value overrides
    args = build_parser().parse_intermixed_args(argv)
    args.deepspeed_config = args.deepspeed_config or args.deepscale_config
    return args


def _launcher_world_size() -> int:
    """The world size the launcher announced (torchrun/deepspeed, then Open MPI); 1 for a plain `python` start."""
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(name):
            return int(os.environ[name])
    return 1


def use_deepspeed_config(cfg, path: str | None) -> None:
    """Read the user's DeepSpeed JSON and check it against ``cfg`` now (one clear error, before any rank waits
    for the others); the trainer merges it into the DeepSpeed config it builds."""
    from pretrain import ds_config
    from pretrain.config import resolve_global_batch

    if path is None:
        ds_config.use_user_config(None)
        return
    user = ds_config.load_user_config(path)
    world = _launcher_world_size()
    resolved = resolve_global_batch(cfg, world)
    ds_config.merge_user_config(ds_config.build_ds_config(resolved, world), user, resolved, world, path)
    ds_config.use_user_config(user, path)


def enable_crash_stacks() -> None:
    """A rank that dies in native code (gloo, NCCL, DALI) still prints each thread's Python stack."""
    if faulthandler.is_enabled():
        return
    try:  # the process's own stderr: sys.stderr may be a captured stream without a file descriptor
        faulthandler.enable(file=sys.__stderr__)
    except (AttributeError, ValueError, OSError):  # no stderr at all (pythonw, closed): nothing to write to
        pass


def print_error(message: str) -> None:
    """``error: MESSAGE`` on stderr in one write. ``print`` writes the text and its newline separately when
    stderr is unbuffered (``PYTHONUNBUFFERED=1``), and ranks that fail together (an agreed checkpoint failure,
    a bad config) print at the same instant into one log: their lines then ran together. One write of a line
    under the pipe's atomic size reaches the log whole."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def _wait_for_every_rank() -> None:
    """Every rank raised the same agreed error: wait until all have printed it. Otherwise the first rank to
    exit makes torchrun or the deepspeed launcher kill the others before their line reaches the log."""
    from pretrain import distributed

    try:
        distributed.barrier()
    except Exception:  # a rank already gone: nothing left to wait for, and the error is printed
        pass


def main(argv: list[str] | None = None) -> int:
    enable_crash_stacks()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from pretrain.config import PretrainConfig

    try:
        cfg = load_config(PretrainConfig, args.config, args.overrides)
        use_deepspeed_config(cfg, args.deepspeed_config)
    except ConfigError as err:
        print_error(str(err))
        return 2
    from common.redact import redact
    from pretrain.engine import NonFiniteLossError, run

    try:
        status = run(cfg)
    except UserError as err:
        # User-fixable problems (world-size change, too few shards, credentials, missing manifest): one line
        # that names the file or setting, not a traceback from every rank.
        print_error(redact(str(err)))
        if getattr(err, "every_rank", False):
            _wait_for_every_rank()
        return 2
    except NonFiniteLossError as err:  # nan_policy=stop: a training fault, not a bad argument
        print_error(str(err))
        return 1
    return 0 if status in ("finished", "stopped", "signal") else 1


if __name__ == "__main__":
    sys.exit(main())

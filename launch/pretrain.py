"""Pretraining entry point.

    deepspeed --num_gpus 2 launch/pretrain.py --config launch/configs/smoke.yaml run_dir=runs/x data.url=...
    torchrun --nproc_per_node 2 launch/pretrain.py --config ...
    python launch/pretrain.py --config ...            # one process

Everything after ``--config PATH`` is ``key=value`` overrides (see ``pretrain/config.py``). The launchers'
``--local_rank``/``--local-rank`` arguments are accepted and ignored (the rank comes from the environment).
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
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


def parse_args(argv: list[str] | None = None) -> tuple[str | None, list[str]]:
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
    args = parser.parse_args(argv)
    return args.config, args.overrides


def enable_crash_stacks() -> None:
    """A rank that dies in native code (gloo, NCCL, DALI) still prints each thread's Python stack."""
    if faulthandler.is_enabled():
        return
    try:  # the process's own stderr: sys.stderr may be a captured stream without a file descriptor
        faulthandler.enable(file=sys.__stderr__)
    except (AttributeError, ValueError, OSError):  # no stderr at all (pythonw, closed): nothing to write to
        pass


def main(argv: list[str] | None = None) -> int:
    enable_crash_stacks()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config_path, overrides = parse_args(argv)
    from pretrain.config import PretrainConfig

    try:
        cfg = load_config(PretrainConfig, config_path, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from common.redact import redact
    from pretrain.engine import NonFiniteLossError, run

    try:
        status = run(cfg)
    except UserError as err:
        # User-fixable problems (world-size change, too few shards, credentials, missing manifest): one line
        # that names the file or setting, not a traceback from every rank.
        print(f"error: {redact(str(err))}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:  # nan_policy=stop: a training fault, not a bad argument
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0 if status in ("finished", "stopped", "signal") else 1


if __name__ == "__main__":
    sys.exit(main())

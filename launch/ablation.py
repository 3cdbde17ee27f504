"""The paper's ablation grid on SynthFace: pretrain every variant with several seeds, evaluate, tabulate.

    python -m launch.ablation --out runs/ablation [--seeds 0,1,2] [--steps 400] [--variants all]
                              [--report docs/results/ablation.md]

Steps (each a command the README documents, run here in sequence; re-running skips finished parts):
1. SynthFace pretraining clips and a disjoint-identity evaluation set (local folders under --out);
2. for each (variant, seed): ``deepspeed --num_gpus 2 launch/pretrain.py --config launch/configs/demo.yaml``
   with the variant's overrides (same images per step for every variant);
3. one ``python -m eval`` fan-out over all backbones;
4. mean +- std over PRETRAINING seeds (each backbone's number is itself the mean over probe seeds) written as
   Markdown with the exact commands, plus a bar plot.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

# The paper's grid (Table 1 of Shu et al. 2022), at equal images per step: SimCLR/TimeAug use 2 views of
# 16 clips per rank, the hard-negative variants 4 views of 8 clips per rank.
VARIANTS: dict[str, list[str]] = {
    "simclr": [
        "sampling.strategy=simclr",
        "sampling.hard_negatives=false",
        "faceswap.enabled=false",
        "loss.fn_mode=none",
        "data.batch_clips=16",
    ],
    "timeaug": [
        "sampling.strategy=timeaug",
        "sampling.hard_negatives=false",
        "faceswap.enabled=false",
        "loss.fn_mode=none",
        "data.batch_clips=16",
    ],
    "timeaug+hardneg": ["sampling.hard_negatives=true", "faceswap.enabled=false", "loss.fn_mode=none"],
    "timeaug+hardneg+faceswap": [
        "sampling.hard_negatives=true",
        "faceswap.enabled=true",
        "loss.fn_mode=none",
    ],
    "timeaug+hardneg+maskfn": ["sampling.hard_negatives=true", "faceswap.enabled=false", "loss.fn_mode=pick"],
    "all four (SSL-FER)": ["sampling.hard_negatives=true", "faceswap.enabled=true", "loss.fn_mode=pick"],
}
FULL_METHOD = "all four (SSL-FER)"
BASELINE = "simclr"
COLUMNS = [
    ("expression", "linear_macro_f1", "expr macro-F1", 100),
    ("expression", "linear_accuracy", "expr acc", 100),
    ("va", "ccc_valence", "V CCC", 1),
    ("va", "ccc_arousal", "A CCC", 1),
    ("identity", "id_1nn_accuracy", "ID 1-NN acc", 100),
    ("identity", "verification_auc", "ID ver AUC", 1),
]


def slug(variant: str) -> str:
    return variant.split(" ")[0].replace("+", "-")


def run(cmd: list[str], log: Path | None = None) -> None:
    print("$ " + shlex.join(cmd), flush=True)
    if log is None:
        subprocess.run(cmd, check=True, cwd=REPO)
        return
    with open(log, "w") as handle:
        proc = subprocess.run(cmd, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"command failed ({proc.returncode}), log {log}:\n{tail}")


def build_data(out: Path, args) -> tuple[Path, Path]:
    pre, ev = out / "data" / "pretrain", out / "data" / "eval"
    py = sys.executable
    if not (pre / "manifest.json").exists():
        run([py, "-m", "data_shards", "synth", "--out", str(pre), "--identities", str(args.identities),
             "--clips-per-identity", "4", "--seconds", "12", "--seed", "0", "--shard-samples", "12",
             "--no-progress"])  # fmt: skip
    if not (ev / "manifest.json").exists():
        run([py, "-m", "data_shards", "evalset", "--source", "synth", "--out", str(ev), "--identities",
             str(args.eval_identities), "--clips-per-identity", "4", "--seconds", "12", "--frames-per-clip", "8",
             "--seed", "0", "--no-progress"])  # fmt: skip
    return pre, ev


def pretrain_cmd(
    variant: str, seed: int, run_dir: Path, data: Path, steps: int, extra: list[str] | None = None
) -> list[str]:
    """The deepspeed command of one run; ``extra`` (``--set``) overrides come last, so they win."""
    from pretrain.distributed import free_port

    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    return [  # a free rendezvous port: two ablations (or an ablation and a training run) can share a machine
        deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), "launch/pretrain.py", "--config", "launch/configs/demo.yaml",
        f"run_dir={run_dir}", f"data.url={data}", f"max_steps={steps}", f"seed={seed}", f"data.seed={seed}",
        "resume=never", "log_every=50", f"checkpoint_every={steps}", *VARIANTS[variant], *(extra or []),
    ]  # fmt: skip


RANDOM_INIT = "random init (no pretraining)"


def select_variants(spec: str) -> list[str]:
    """``all`` (every variant) or comma-separated exact slugs ("timeaug-hardneg-maskfn" does not also select
    "timeaug"). The full method's slug is ``all`` too (its run folders are ``all-s<seed>``), so alone it would
    mean every variant: ``sslfer`` names the full method unambiguously."""
    if spec == "all":
        return list(VARIANTS)
    wanted = [w.strip() for w in spec.split(",") if w.strip()]
    wanted = [slug(FULL_METHOD) if w == "sslfer" else w for w in wanted]
    unknown = sorted(set(wanted) - {slug(v) for v in VARIANTS})
    if unknown or not wanted:
        raise ValueError(f"--variants: unknown {unknown}; choose from {[slug(v) for v in VARIANTS]} or all")
    return [v for v in VARIANTS if slug(v) in wanted]


def write_random_init(run_dir: Path, seed: int) -> None:
    """``run_dir/backbone.pt`` with the demo config's backbone at random weights, and its ``config.yaml`` (the
    evaluation reads the crop size from it)."""
    from common.configio import load_config, save_config
    from pretrain.config import PretrainConfig
    from pretrain.model import build_backbone, save_backbone

    if (run_dir / "backbone.pt").exists():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = load_config(
        PretrainConfig, REPO / "launch/configs/demo.yaml", [f"run_dir={run_dir}", f"seed={seed}"]
    )
    torch.manual_seed(seed)
    save_backbone(build_backbone(cfg.model), run_dir / "backbone.pt")
    save_config(cfg, run_dir / "config.yaml")


def per_seed(results: dict, runs: dict[str, list[str]]) -> dict[str, dict[str, dict[int, float]]]:
    """variant -> column label -> {pretraining seed: value}; a run's value is the mean over probe seeds."""
    table: dict[str, dict[str, dict[int, float]]] = {}
    for variant, names in runs.items():
        row: dict[str, dict[int, float]] = {}
        for task, metric, label, scale in COLUMNS:
            for name in names:
                cells = results["results"].get(name, {}).get(task, {})
                values = [
                    c["metrics"][metric]["mean"] * scale
                    for c in cells.values()
                    if metric in c.get("metrics", {})
                ]
                if values:
                    row.setdefault(label, {})[int(name.rsplit("-s", 1)[1])] = float(np.mean(values))
        table[variant] = row
    return table


def summarise(values: list[float]) -> tuple[float, float, int]:
    """(mean, SAMPLE standard deviation (ddof=1; 0 for one value), n)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0, int(array.size)


def paired_difference(values: dict[int, float], baseline: dict[int, float]) -> dict[str, float] | None:
    """Mean paired difference over the seeds both have, with its 95% t-interval (None under 2 seeds)."""
    from scipy import stats

    seeds = sorted(set(values) & set(baseline))
    if len(seeds) < 2:
        return None
    diff = np.asarray([values[s] - baseline[s] for s in seeds])
    mean, sd, n = float(diff.mean()), float(diff.std(ddof=1)), len(seeds)
    half = float(stats.t.ppf(0.975, n - 1) * sd / np.sqrt(n))
    return {"mean": mean, "sd": sd, "n": n, "low": mean - half, "high": mean + half}


def aggregate(results: dict, runs: dict[str, list[str]]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """variant -> label -> (mean, sample std, n) over pretraining seeds."""
    return {
        variant: {label: summarise(list(by_seed.values())) for label, by_seed in row.items()}
        for variant, row in per_seed(results, runs).items()
    }


def render(table, commands: list[str], wall_s: float, args, out: Path, seeds_table=None) -> str:
    from data_shards.synth import SynthConfig

    labels = [c[2] for c in COLUMNS]
    lines = [
        "# Ablation on SynthFace (Shu et al. 2022, Table 1 grid)",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `python -m launch.ablation` on a "
        f"{os.cpu_count()}-core CPU machine (no GPU); wall time {wall_s / 60:.1f} min.",
        f"Pretraining: ResNet-18 (width 16), 64 px crops, {args.steps} steps, 2 CPU ranks, 64 images per step, "
        f"{args.identities} pretraining identities; SynthFace at its defaults (expression_scale "
        f"{SynthConfig.expression_scale}, zoom {SynthConfig.zoom}). Evaluation: {args.eval_identities} identities never seen in "
        "pretraining; linear probes on frozen features. Mean +- SAMPLE std over pretraining seeds "
        f"{args.seeds}; each seed's value is the mean over 3 probe seeds. Expression F1/accuracy and identity "
        "accuracy in %; chance for 8 classes is 12.5%.",
        "",
        "| variant | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    scales = {c[2]: c[3] for c in COLUMNS}
    for variant, row in table.items():
        cells = []
        for label in labels:
            if label not in row:
                cells.append("n/a")
                continue
            digits = 1 if scales[label] == 100 else 3  # percentages vs CCC/AUC
            cells.append(f"{row[label][0]:.{digits}f} ± {row[label][1]:.{digits}f}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    if seeds_table is not None and BASELINE in seeds_table:
        lines += [
            "",
            f"Paired difference to {BASELINE} over the seeds both have (variant minus {BASELINE}), mean and 95% "
            "t-interval; an interval that contains 0 shows no effect at this power.",
            "",
            "| variant | " + " | ".join(labels) + " |",
            "|---|" + "---|" * len(labels),
        ]
        for variant, row in seeds_table.items():
            if variant == BASELINE:
                continue
            cells = []
            for label in labels:
                diff = paired_difference(row.get(label, {}), seeds_table[BASELINE].get(label, {}))
                digits = 1 if scales[label] == 100 else 3
                cells.append(
                    "n/a"
                    if diff is None
                    else f"{diff['mean']:+.{digits}f} [{diff['low']:+.{digits}f}, {diff['high']:+.{digits}f}]"
                )
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        lines += ["", "Per seed (seed: value):", ""]
        for variant, row in seeds_table.items():
            for label in (labels[0], labels[-1]):
                values = ", ".join(
                    f"{seed}: {value:.{1 if scales[label] == 100 else 3}f}"
                    for seed, value in sorted(row.get(label, {}).items())
                )
                lines.append(f"- {variant}, {label}: {values}")
    lines += [
        "",
        "Higher is better for expression and V/A; LOWER identity accuracy/AUC means less identity leakage.",
        "What these numbers do and do not show, and why: [FINDINGS.md](FINDINGS.md).",
        "",
        f"![ablation]({Path(args.report).with_suffix('.png').name})",
        "",
        "## Commands",
        "",
        "```bash",
        *commands,
        "```",
        "",
    ]
    return "\n".join(lines)


def plot(table, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [c[2] for c in COLUMNS]
    fig, axes = plt.subplots(1, len(labels), figsize=(3.2 * len(labels), 3.6))
    variants = list(table)
    for ax, label in zip(axes, labels):
        means = [table[v].get(label, (np.nan, 0, 0))[0] for v in variants]
        stds = [table[v].get(label, (np.nan, 0, 0))[1] for v in variants]
        ax.bar(
            range(len(variants)), means, yerr=stds, capsize=3, color=plt.cm.tab10(np.arange(len(variants)))
        )
        ax.set_xticks(range(len(variants)), [slug(v) for v in variants], rotation=60, ha="right", fontsize=7)
        ax.set_title(label, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--identities", type=int, default=48)
    parser.add_argument("--eval-identities", type=int, default=40)
    parser.add_argument(
        "--variants",
        default="all",
        help="comma-separated slugs, or all (every variant); sslfer = the full method",
    )
    parser.add_argument("--report", default="docs/results/ablation.md")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="config override for every pretraining run (repeatable), e.g. faceswap.p_warmup_steps=1000",
    )  # fmt: skip
    parser.add_argument(
        "--report-only", action="store_true", help="re-render the report from an earlier run's results"
    )
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    try:
        variants = select_variants(args.variants)
    except ValueError as err:
        parser.error(str(err))
    out = (REPO / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    started = time.monotonic()
    pre, ev = build_data(out, args)
    commands = [
        f"python -m data_shards synth --out {pre.relative_to(REPO)} --identities {args.identities} "
        "--clips-per-identity 4 --seconds 12 --seed 0 --shard-samples 12",
        f"python -m data_shards evalset --source synth --out {ev.relative_to(REPO)} --identities "
        f"{args.eval_identities} --clips-per-identity 4 --seconds 12 --frames-per-clip 8 --seed 0",
    ]
    runs: dict[str, list[str]] = {}
    checkpoints = []
    # seed-major: an interrupted ablation still holds complete pairs for the paired differences
    for seed in seeds:
        for variant in variants:
            name = f"{slug(variant)}-s{seed}"
            run_dir = out / name
            cmd = pretrain_cmd(variant, seed, run_dir, pre, args.steps, args.set)
            shown = [a for i, a in enumerate(cmd) if "--master_port" not in cmd[max(0, i - 1) : i + 1]]
            commands.append(shlex.join(["deepspeed", *shown[1:]]).replace(str(REPO) + "/", ""))
            if not (run_dir / "backbone.pt").exists():
                run(cmd, log=out / f"{name}.log")
            runs.setdefault(variant, []).append(name)
            checkpoints.append(str(run_dir / "backbone.pt"))
    # Reference row: the same backbone with random weights (no pretraining), one per seed; what a probe reads
    # from architecture alone tells how much each pretraining variant adds or removes.
    for seed in seeds:
        name = f"{slug(RANDOM_INIT)}-s{seed}"
        write_random_init(out / name, seed)
        runs.setdefault(RANDOM_INIT, []).append(name)
        checkpoints.append(str(out / name / "backbone.pt"))
    commands.append(
        "random init: the demo config's backbone with torch.manual_seed(SEED), saved unchanged "
        "(launch/ablation.py write_random_init)"
    )
    eval_out = out / "eval"
    eval_cmd = [sys.executable, "-m", "eval", "--checkpoint", ",".join(checkpoints), "--data", str(ev),
                "--tasks", "expression,va,identity", "--seeds", "3", "--out", str(eval_out), "--no-progress"]  # fmt: skip
    commands.append(
        "python -m eval --checkpoint <the backbones above, comma-separated> "
        f"--data {ev.relative_to(REPO)} --tasks expression,va,identity --seeds 3 --out {eval_out.relative_to(REPO)}"
    )
    if not (args.report_only and (eval_out / "results.json").exists()):
        run(eval_cmd, log=out / "eval.log")
    results = json.loads((eval_out / "results.json").read_text())
    table = aggregate(results, runs)
    report = REPO / args.report
    report.parent.mkdir(parents=True, exist_ok=True)
    plot(table, report.with_suffix(".png"))
    wall_path = out / "wall_s.txt"
    if not args.report_only:
        wall_path.write_text(f"{time.monotonic() - started:.0f}")
    wall_s = float(wall_path.read_text()) if wall_path.exists() else time.monotonic() - started
    seeds_table = per_seed(results, runs)
    report.write_text(render(table, commands, wall_s, args, out, seeds_table))
    (out / "ablation.json").write_text(json.dumps({"summary": table, "per_seed": seeds_table}, indent=2))
    print(report.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Write an evaluation's outputs: results.json, results.md, PNG plots and the resolved config.

``DIR/results.json`` (schema_version 1)::

    {"schema_version": 1, "created": ISO-8601, "wall_s": float,
     "checkpoints": {name: path}, "datasets": {name: url}, "tasks": [str], "seeds": [int],
     "cluster": {"CPU": n, "GPU": n},
     "results": {checkpoint: {task: {dataset: {
         "metrics": {metric: {"mean": float|null, "std": float|null, "seeds": [int], "values": [float|null]}},
         "confusion": [[int]]            # expression/finetune only: rows true, columns predicted, summed over seeds
         "errors": [{"seed": int, "error": str}]}}}}}

Metrics per task: expression -> linear_macro_f1, linear_accuracy, linear_weight_decay, knn_macro_f1,
knn_accuracy; va -> ccc_valence, ccc_arousal, rmse_valence, rmse_arousal, ridge_alpha; identity ->
id_1nn_accuracy, id_chance, verification_auc, verification_eer; finetune -> ft_macro_f1, ft_accuracy,
ft_best_epoch, ft_val_macro_f1. ``std`` is the population std over seeds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from data_shards.labels import EXPRESSIONS

HEADLINE = {
    "expression": [
        ("linear_macro_f1", "expr F1"),
        ("linear_accuracy", "expr acc"),
        ("knn_macro_f1", "kNN F1"),
    ],
    "va": [
        ("ccc_valence", "V CCC"),
        ("ccc_arousal", "A CCC"),
        ("rmse_valence", "V RMSE"),
        ("rmse_arousal", "A RMSE"),
    ],
    "identity": [
        ("id_1nn_accuracy", "ID 1-NN acc"),
        ("verification_auc", "ID ver AUC"),
        ("verification_eer", "ID EER"),
    ],
    "finetune": [("ft_macro_f1", "FT F1"), ("ft_accuracy", "FT acc")],
}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _fmt(summary: dict[str, Any] | None) -> str:
    if not summary or summary.get("mean") is None:
        return "n/a"
    return f"{summary['mean']:.3f} ± {summary['std']:.3f}"


def markdown_table(doc: dict[str, Any]) -> str:
    """One row per checkpoint; a column per (dataset, headline metric) that any checkpoint has."""
    results = doc["results"]
    columns = []
    for dname in doc["datasets"]:
        for task in doc["tasks"]:
            for metric, label in HEADLINE.get(task, []):
                if any(
                    metric in results.get(c, {}).get(task, {}).get(dname, {}).get("metrics", {})
                    for c in results
                ):
                    prefix = f"{dname} " if len(doc["datasets"]) > 1 else ""
                    columns.append((dname, task, metric, prefix + label))
    lines = [
        f"# Evaluation results ({len(doc['seeds'])} seeds, mean ± std)",
        "",
        "| checkpoint | " + " | ".join(c[3] for c in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for ckpt in doc["checkpoints"]:
        cells = [
            _fmt(results.get(ckpt, {}).get(t, {}).get(d, {}).get("metrics", {}).get(m))
            for d, t, m, _ in columns
        ]
        lines.append(f"| {ckpt} | " + " | ".join(cells) + " |")
    errors = [
        f"- {c} / {t} / {d} seed {e['seed']}: {e['error']}"
        for c, tasks in results.items()
        for t, dsets in tasks.items()
        for d, cell in dsets.items()
        for e in cell.get("errors", [])
    ]
    if errors:
        lines += ["", "## Failed cells", *errors]
    lines += [
        "",
        "Expression and V/A probes: test identities disjoint from training identities (and from pretraining).",
        "Identity: lower 1-NN accuracy / AUC and higher EER = less identity in the features.",
    ]
    return "\n".join(lines) + "\n"


def plot_bars(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    """Per dataset: one panel per headline metric, one bar per checkpoint, error bar = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    ckpts = list(doc["checkpoints"])
    for dname in doc["datasets"]:
        panels = [
            (task, metric, label)
            for task in doc["tasks"]
            for metric, label in HEADLINE.get(task, [])
            if any(
                metric in doc["results"].get(c, {}).get(task, {}).get(dname, {}).get("metrics", {})
                for c in ckpts
            )
        ]
        if not panels:
            continue
        cols = min(4, len(panels))
        rows = (len(panels) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
        colours = plt.cm.tab10(np.arange(len(ckpts)) % 10)
        for ax, (task, metric, label) in zip(axes.flat, panels):
            summaries = [
                doc["results"].get(c, {}).get(task, {}).get(dname, {}).get("metrics", {}).get(metric)
                for c in ckpts
            ]
            means = [s["mean"] if s and s["mean"] is not None else np.nan for s in summaries]
            stds = [s["std"] if s and s["std"] is not None else 0.0 for s in summaries]
            ax.bar(range(len(ckpts)), means, yerr=stds, color=colours, capsize=4)
            ax.set_xticks(range(len(ckpts)), ckpts, rotation=30, ha="right", fontsize=8)
            ax.set_title(label, fontsize=10)
            ax.grid(axis="y", alpha=0.3)
        for ax in list(axes.flat)[len(panels) :]:
            ax.axis("off")
        fig.suptitle(f"{dname}: mean ± std over {len(doc['seeds'])} seeds", fontsize=11)
        fig.tight_layout()
        path = out_dir / f"bars_{_safe(dname)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_confusions(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    """Row-normalised confusion matrices (summed over seeds) for every cell that has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for ckpt, tasks in doc["results"].items():
        for task, dsets in tasks.items():
            for dname, cell in dsets.items():
                if "confusion" not in cell:
                    continue
                counts = np.asarray(cell["confusion"], dtype=np.float64)
                rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
                names = list(EXPRESSIONS[: len(counts)])
                fig, ax = plt.subplots(figsize=(5.2, 4.6))
                im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
                for i in range(len(names)):
                    for j in range(len(names)):
                        if counts[i].sum():
                            colour = "white" if rates[i, j] > 0.5 else "black"
                            ax.text(
                                j, i, f"{rates[i, j]:.2f}", ha="center", va="center", fontsize=7, color=colour
                            )
                ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
                ax.set_yticks(range(len(names)), names, fontsize=8)
                ax.set_xlabel("predicted")
                ax.set_ylabel("true")
                ax.set_title(f"{ckpt} / {task} / {dname}", fontsize=9)
                fig.colorbar(im, ax=ax, fraction=0.046)
                fig.tight_layout()
                path = out_dir / f"confusion_{_safe(ckpt)}_{_safe(task)}_{_safe(dname)}.png"
                fig.savefig(path, dpi=110)
                plt.close(fig)
                paths.append(path)
    return paths


def pca_2d(features: np.ndarray) -> np.ndarray:
    x = features - features.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:2].T


def plot_projections(features: dict, labels: dict, out_dir: Path, max_points: int = 3000) -> list[Path]:
    """PCA of each (checkpoint, dataset)'s features, coloured by expression and by identity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for (ckpt, dname), feats in features.items():
        lab = labels.get(dname)
        if feats is None or lab is None or len(feats) < 3:
            continue
        idx = np.random.default_rng(0).permutation(len(feats))[:max_points]
        xy = pca_2d(np.asarray(feats, np.float64)[idx])
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
        expr = lab.expression[idx]
        for k, name in enumerate(EXPRESSIONS):
            sel = expr == k
            if sel.any():
                axes[0].scatter(xy[sel, 0], xy[sel, 1], s=6, color=plt.cm.tab10(k), label=name)
        if (expr < 0).any():
            axes[0].scatter(xy[expr < 0, 0], xy[expr < 0, 1], s=4, color="0.7", label="unknown")
        axes[0].legend(fontsize=7, markerscale=2, loc="best")
        axes[0].set_title("coloured by expression", fontsize=10)
        _, ident = np.unique(lab.identity[idx], return_inverse=True)
        axes[1].scatter(xy[:, 0], xy[:, 1], s=6, c=ident % 20, cmap="tab20")
        axes[1].set_title(f"coloured by identity ({ident.max() + 1} ids)", fontsize=10)
        for ax in axes:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(f"PCA of frozen features: {ckpt} on {dname}", fontsize=11)
        fig.tight_layout()
        path = out_dir / f"pca_{_safe(ckpt)}_{_safe(dname)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(doc: dict[str, Any], out_dir: str | Path, features=None, labels=None) -> dict[str, Path]:
    """Write results.json, results.md and the plots into ``out_dir``; returns the written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2, allow_nan=False))
    tmp.replace(out / "results.json")  # readers never see a half-written file
    (out / "results.md").write_text(markdown_table(doc))
    written = {"results.json": out / "results.json", "results.md": out / "results.md"}
    for path in plot_bars(doc, out) + plot_confusions(doc, out):
        written[path.name] = path
    if features:
        for path in plot_projections(features, labels or {}, out):
            written[path.name] = path
    return written

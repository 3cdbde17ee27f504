"""Probes on frozen features: linear and k-NN expression classifiers, V/A ridge regression, identity leakage.

All probes standardise features with the training statistics, are seeded, and choose their regularisation
on a validation split carved from the training data (by identity when identities are known), never on the
test set. Each returns a flat ``dict[str, float]`` of metrics plus, where useful, extras for plots.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from common.errors import ConfigError
from eval import metrics
from eval.data import carve_validation


@dataclass
class ProbeConfig:
    weight_decays: list[float] = field(  # linear-probe weight decays tried; the best on validation is kept
        default_factory=lambda: [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    )
    lbfgs_max_iter: int = 200  # L-BFGS iterations of the linear probe
    knn_k: int = 10  # neighbours of the cosine k-NN probe
    ridge_alphas: list[float] = field(  # ridge penalties tried for V/A; the best on validation is kept
        default_factory=lambda: [1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0]
    )
    val_fraction: float = 0.2  # identities carved from train for model selection
    verification_pairs: int = 2000  # same/different pairs for verification AUC/EER

    def validate(self) -> None:
        if not self.weight_decays or any(w < 0 for w in self.weight_decays):
            raise ConfigError(
                f"config key 'probes.weight_decays': non-negative values needed, got {self.weight_decays}"
            )
        if not self.ridge_alphas or any(a <= 0 for a in self.ridge_alphas):
            raise ConfigError(
                f"config key 'probes.ridge_alphas': positive values needed, got {self.ridge_alphas}"
            )
        if self.knn_k < 1:
            raise ConfigError(f"config key 'probes.knn_k': must be >= 1, got {self.knn_k}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"config key 'probes.val_fraction': must be in (0, 1), got {self.val_fraction}")
        if self.lbfgs_max_iter < 1:
            raise ConfigError(f"config key 'probes.lbfgs_max_iter': must be >= 1, got {self.lbfgs_max_iter}")


def standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Zero mean, unit variance per dimension using the training statistics only."""
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 1e-8, std, 1.0)  # constant dimensions stay zero instead of exploding
    return [((x - mean) / std).astype(np.float32) for x in (train, *others)]


def fit_logistic(
    x: np.ndarray, y: np.ndarray, num_classes: int, weight_decay: float, seed: int, max_iter: int = 200
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, full-batch L-BFGS; returns (weight [C, D], bias [C])."""
    gen = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).double()
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    weight = (
        0.01 * torch.randn(num_classes, x.shape[1], generator=gen, dtype=torch.float64)
    ).requires_grad_()
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-7, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xt @ weight.T + bias, yt) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach().float(), bias.detach().float()


def predict_logistic(x: np.ndarray, weight: torch.Tensor, bias: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return (torch.from_numpy(np.asarray(x, np.float32)) @ weight.T + bias).argmax(1).numpy()


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int, prefix: str) -> dict:
    return {
        f"{prefix}_macro_f1": metrics.macro_f1(y_true, y_pred, num_classes),
        f"{prefix}_accuracy": metrics.accuracy(y_true, y_pred),
    }


def linear_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
    cfg: ProbeConfig,
    seed: int,
    groups: np.ndarray | None = None,
) -> dict[str, Any]:
    """Pick weight decay by validation macro-F1, refit on all training data, score the test set."""
    fit_idx, val_idx = carve_validation(len(y_train), seed, cfg.val_fraction, groups)
    xs_fit, xs_val = standardise(x_train[fit_idx], x_train[val_idx])
    best_wd, best_f1 = cfg.weight_decays[0], -1.0
    for wd in cfg.weight_decays:
        w, b = fit_logistic(xs_fit, y_train[fit_idx], num_classes, wd, seed, cfg.lbfgs_max_iter)
        f1 = metrics.macro_f1(y_train[val_idx], predict_logistic(xs_val, w, b), num_classes)
        if f1 > best_f1:
            best_wd, best_f1 = wd, f1
    xs_train, xs_test = standardise(x_train, x_test)
    w, b = fit_logistic(xs_train, y_train, num_classes, best_wd, seed, cfg.lbfgs_max_iter)
    pred = predict_logistic(xs_test, w, b)
    out = classification_metrics(y_test, pred, num_classes, "linear")
    out["linear_weight_decay"] = best_wd
    return {
        "metrics": out,
        "confusion": metrics.confusion_matrix(y_test, pred, num_classes).tolist(),
        "per_class_recall": metrics.per_class_recall(y_test, pred, num_classes).tolist(),
    }


def knn_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, num_classes: int, k: int):
    """Cosine k-NN with similarity-weighted votes (ties broken by the nearest neighbour's class)."""
    a = x_test / np.maximum(np.linalg.norm(x_test, axis=1, keepdims=True), 1e-12)
    b = x_train / np.maximum(np.linalg.norm(x_train, axis=1, keepdims=True), 1e-12)
    sims = a @ b.T
    k = min(k, len(y_train))
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    votes = np.zeros((len(x_test), num_classes))
    rows = np.arange(len(x_test))[:, None]
    np.add.at(votes, (rows, y_train[top]), np.exp(sims[rows, top] / 0.07))
    return votes.argmax(1)


def knn_probe(x_train, y_train, x_test, y_test, num_classes: int, cfg: ProbeConfig) -> dict[str, float]:
    xs_train, xs_test = standardise(x_train, x_test)
    pred = knn_predict(xs_train, y_train, xs_test, num_classes, cfg.knn_k)
    return classification_metrics(y_test, pred, num_classes, "knn")


def fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form ridge on centred data; y is [N, T]; returns (coef [D, T], intercept [T])."""
    x = x.astype(np.float64)
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    coef = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ yc)
    return coef, y_mean - x_mean @ coef


def va_regression(
    x_train: np.ndarray,
    va_train: np.ndarray,
    x_test: np.ndarray,
    va_test: np.ndarray,
    cfg: ProbeConfig,
    seed: int,
    groups: np.ndarray | None = None,
) -> dict[str, Any]:
    """Ridge from features to (valence, arousal); alpha by validation mean CCC; CCC and RMSE on test."""
    fit_idx, val_idx = carve_validation(len(va_train), seed, cfg.val_fraction, groups)
    xs_fit, xs_val = standardise(x_train[fit_idx], x_train[val_idx])
    best_alpha, best_ccc = cfg.ridge_alphas[0], -np.inf
    for alpha in cfg.ridge_alphas:
        coef, icpt = fit_ridge(xs_fit, va_train[fit_idx], alpha)
        pred = xs_val @ coef + icpt
        score = np.nanmean([metrics.ccc(va_train[val_idx, j], pred[:, j]) for j in range(2)])
        if score > best_ccc:
            best_alpha, best_ccc = alpha, score
    xs_train, xs_test = standardise(x_train, x_test)
    coef, icpt = fit_ridge(xs_train, va_train, best_alpha)
    pred = xs_test @ coef + icpt
    out = {}
    for j, name in enumerate(("valence", "arousal")):
        out[f"ccc_{name}"] = metrics.ccc(va_test[:, j], pred[:, j])
        out[f"rmse_{name}"] = metrics.rmse(va_test[:, j], pred[:, j])
    out["ridge_alpha"] = best_alpha
    return {"metrics": out}


def verification_pairs(
    identity: np.ndarray, n_pairs: int, seed: int, clip: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(pairs [M, 2], same [M]): about half same-identity pairs, half different-identity pairs.

    A same-identity pair always takes its two frames from two different clips (``clip`` None: every frame
    is its own clip), so near-duplicate frames of one clip never count as a match."""
    rng = np.random.default_rng(seed)
    clip = np.asarray([f"#{i}" for i in range(len(identity))], dtype=object) if clip is None else clip
    ids, inverse = np.unique(identity, return_inverse=True)
    members = [np.flatnonzero(inverse == i) for i in range(len(ids))]
    multi = [m for m in members if np.unique(clip[m]).size >= 2]
    pairs, same = [], []
    if multi:
        for _ in range(n_pairs // 2):
            group = multi[rng.integers(len(multi))]
            first = rng.choice(group)
            others = group[clip[group] != clip[first]]
            pairs.append([first, rng.choice(others)])
            same.append(True)
    if len(ids) >= 2:
        for _ in range(n_pairs - len(pairs)):
            a, b = rng.choice(len(ids), size=2, replace=False)
            pairs.append([rng.choice(members[a]), rng.choice(members[b])])
            same.append(False)
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2), np.asarray(same, dtype=bool)


def identity_leakage(
    features: np.ndarray,
    identity: np.ndarray,
    gallery: np.ndarray,
    probe: np.ndarray,
    cfg: ProbeConfig,
    seed: int,
    clip: np.ndarray | None = None,
) -> dict[str, Any]:
    """1-NN identity accuracy (gallery/probe per identity) and same/different verification AUC and EER.

    Features are standardised on the gallery. Higher numbers = more identity in the features; for an
    expression encoder lower is better.
    """
    xs_gallery, xs_probe, xs_all = standardise(features[gallery], features[probe], features)
    acc = metrics.nn_identity_accuracy(xs_gallery, identity[gallery], xs_probe, identity[probe])
    known = np.flatnonzero(identity != "")
    clip_known = None if clip is None else np.asarray(clip, dtype=object)[known]
    pairs, same = verification_pairs(identity[known], cfg.verification_pairs, seed, clip_known)
    x = xs_all[known]
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    scores = np.sum(x[pairs[:, 0]] * x[pairs[:, 1]], axis=1)
    return {
        "metrics": {
            "id_1nn_accuracy": acc,
            "id_chance": 1.0 / max(len(np.unique(identity[gallery])), 1),
            "verification_auc": metrics.roc_auc(same, scores),
            "verification_eer": metrics.equal_error_rate(same, scores),
        }
    }

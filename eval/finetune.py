"""The paper's fine-tuning protocol: the whole backbone plus an MLP head trained on labelled expressions.

Head: feature_dim -> 2048 -> 1024 -> 512 -> C (ReLU, dropout 0.5). Adam lr 1e-4, weight decay 5e-4, batch 64,
20 epochs, balanced-softmax loss (logits shifted by the log class prior during training, so rare classes are
not drowned by frequent ones). The epoch kept is the best macro-F1 on a validation split carved from the
training data (by identity when known); the test set is scored once, with that model.
Training views: random crop + horizontal flip; evaluation views: centre crop (as in ``eval.features``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError
from eval import metrics
from eval.data import carve_validation
from eval.features import decode_batch, normalise, resolve_device


@dataclass
class FinetuneConfig:
    head_dims: list[int] = field(default_factory=lambda: [2048, 1024, 512])  # MLP head hidden sizes
    dropout: float = 0.5  # head dropout
    lr: float = 1e-4  # Adam learning rate
    weight_decay: float = 5e-4  # Adam weight decay
    batch_size: int = 64  # images per step
    epochs: int = 20  # epochs; the best validation epoch is kept
    resize: int = 128  # shorter side before the crop
    crop: int = 112  # centre crop size
    val_fraction: float = 0.1  # share of training data carved out for validation
    device: str = "auto"  # auto, cpu, cuda or cuda:N

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"config key 'finetune.epochs': must be >= 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ConfigError(
                f"config key 'finetune.batch_size': must be >= 2 (BatchNorm), got {self.batch_size}"
            )
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"config key 'finetune.dropout': must be in [0, 1), got {self.dropout}")
        if self.crop > self.resize:
            raise ConfigError(f"config key 'finetune.crop': must be <= finetune.resize, got {self.crop}")


def build_head(in_dim: int, hidden: list[int], num_classes: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    prev = in_dim
    for dim in hidden:
        layers += [nn.Linear(prev, dim), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        prev = dim
    layers.append(nn.Linear(prev, num_classes))
    return nn.Sequential(*layers)


class Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def balanced_softmax_loss(
    logits: torch.Tensor, target: torch.Tensor, log_prior: torch.Tensor
) -> torch.Tensor:
    """Ren et al. 2020: cross-entropy on logits + log p(class)."""
    return F.cross_entropy(logits + log_prior, target)


def random_views(images: torch.Tensor, crop: int, gen: torch.Generator) -> torch.Tensor:
    """Random crop (one offset per image) and horizontal flip of a uint8 batch [B, 3, S, S]."""
    size = images.shape[-1]
    out = torch.empty((images.shape[0], 3, crop, crop), dtype=images.dtype)
    offsets = torch.randint(0, size - crop + 1, (images.shape[0], 2), generator=gen)
    flips = torch.rand(images.shape[0], generator=gen) < 0.5
    for i, (top, left) in enumerate(offsets.tolist()):
        view = images[i, :, top : top + crop, left : left + crop]
        out[i] = view.flip(-1) if flips[i] else view
    return out


def _centre(images: torch.Tensor, crop: int) -> torch.Tensor:
    off = (images.shape[-1] - crop) // 2
    return images[..., off : off + crop, off : off + crop]


@torch.no_grad()
def predict(
    model: nn.Module, images: torch.Tensor, crop: int, device: torch.device, batch: int
) -> np.ndarray:
    model.eval()
    preds = []
    for start in range(0, len(images), batch):
        x = normalise(_centre(images[start : start + batch], crop).to(device))
        preds.append(model(x).argmax(1).cpu().numpy())
    return np.concatenate(preds) if preds else np.zeros(0, np.int64)


def finetune(
    checkpoint: str,
    train_jpegs: list[bytes],
    train_labels: np.ndarray,
    test_jpegs: list[bytes],
    test_labels: np.ndarray,
    num_classes: int,
    cfg: FinetuneConfig,
    seed: int,
    groups: np.ndarray | None = None,
) -> dict[str, Any]:
    """Fine-tune from ``checkpoint``; returns test metrics of the best-validation epoch."""
    from pretrain.model import load_backbone

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    device = resolve_device(cfg.device)
    backbone = load_backbone(checkpoint)
    model = Classifier(
        backbone, build_head(backbone.feature_dim, cfg.head_dims, num_classes, cfg.dropout)
    ).to(device)

    fit_idx, val_idx = carve_validation(len(train_labels), seed, cfg.val_fraction, groups)
    # Decode once at the stored size; crops are taken per batch.
    train_images = decode_batch(train_jpegs, cfg.resize, cfg.resize)
    test_images = decode_batch(test_jpegs, cfg.resize, cfg.resize)
    y = torch.from_numpy(np.asarray(train_labels, np.int64))
    counts = torch.bincount(y[fit_idx], minlength=num_classes).float()
    log_prior = torch.log((counts + 1.0) / (counts.sum() + num_classes)).to(device)  # +1: unseen classes

    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best_f1, best_state, best_epoch, history = -1.0, None, -1, []
    for epoch in range(cfg.epochs):
        model.train()
        order = fit_idx[torch.randperm(len(fit_idx), generator=gen).numpy()]
        losses = []
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            x = normalise(random_views(train_images[idx], cfg.crop, gen).to(device))
            loss = balanced_softmax_loss(model(x), y[idx].to(device), log_prior)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        val_pred = predict(model, train_images[val_idx], cfg.crop, device, cfg.batch_size)
        val_f1 = metrics.macro_f1(train_labels[val_idx], val_pred, num_classes)
        history.append(
            {"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan"), "val_f1": val_f1}
        )
        if val_f1 > best_f1:
            best_f1, best_epoch = val_f1, epoch
            best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    pred = predict(model, test_images, cfg.crop, device, cfg.batch_size)
    return {
        "metrics": {
            "ft_macro_f1": metrics.macro_f1(test_labels, pred, num_classes),
            "ft_accuracy": metrics.accuracy(test_labels, pred),
            "ft_best_epoch": float(best_epoch),
            "ft_val_macro_f1": best_f1,
        },
        "confusion": metrics.confusion_matrix(test_labels, pred, num_classes).tolist(),
        "history": history,
    }

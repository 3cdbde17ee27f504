"""Frozen-backbone features: decode JPEGs, centre-crop like training (no random augmentation), embed.

Preprocessing matches pretraining's eval view: resize to ``resize`` px, centre crop ``crop`` px, ImageNet
normalisation. Batches run on CUDA when available in fp32, else on the CPU.
"""

from __future__ import annotations

import dataclasses
import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from common.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class FeatureConfig:
    resize: int = 128  # shorter side before the crop (the stored face size)
    crop: int = 112  # the pretraining crop
    batch_size: int = 256  # images per forward pass
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    match_run: bool = True  # use augment.resize/crop of the run's config.yaml beside backbone.pt when present

    def validate(self) -> None:
        if self.crop <= 0 or self.crop > self.resize:
            raise ConfigError(
                f"config key 'features.crop': must be in 1..features.resize ({self.resize}), got {self.crop}"
            )
        if self.batch_size <= 0:
            raise ConfigError(f"config key 'features.batch_size': must be > 0, got {self.batch_size}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def decode_batch(jpegs: list[bytes], resize: int, crop: int) -> torch.Tensor:
    """JPEG bytes -> uint8 tensor [B, 3, crop, crop] (resize shorter side, centre crop)."""
    out = torch.empty((len(jpegs), 3, crop, crop), dtype=torch.uint8)
    for i, data in enumerate(jpegs):
        try:  # load_frames left out what fails its checks; a body that is corrupt past them still must not stop
            image = Image.open(io.BytesIO(data)).convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            image = Image.new("RGB", (crop, crop), (128, 128, 128))
        w, h = image.size
        scale = resize / min(w, h)
        if (w, h) != (round(w * scale), round(h * scale)):
            image = image.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
        w, h = image.size
        left, top = (w - crop) // 2, (h - crop) // 2
        image = image.crop((left, top, left + crop, top + crop))
        out[i] = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
    return out


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,H,W] on any device -> ImageNet-normalised float."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


@torch.no_grad()
def embed(backbone: torch.nn.Module, jpegs: list[bytes], cfg: FeatureConfig) -> np.ndarray:
    """Features [N, D] float32 of ``jpegs`` under a frozen ``backbone`` (put in eval mode here)."""
    device = resolve_device(cfg.device)
    backbone = backbone.to(device).eval()
    chunks = []
    for start in range(0, len(jpegs), cfg.batch_size):
        images = decode_batch(jpegs[start : start + cfg.batch_size], cfg.resize, cfg.crop)
        feats = backbone(normalise(images.to(device, non_blocking=True)))
        chunks.append(feats.float().cpu().numpy())
    return np.concatenate(chunks, axis=0) if chunks else np.zeros((0, 0), np.float32)


def run_preprocessing(checkpoint: str, cfg: FeatureConfig) -> FeatureConfig:
    """The resize/crop the backbone was trained at (its run's config.yaml), so features see the same scale."""
    run_config = Path(checkpoint).with_name("config.yaml")
    if not cfg.match_run or not run_config.is_file():
        return cfg
    augment = (yaml.safe_load(run_config.read_text()) or {}).get("augment") or {}
    resize, crop = augment.get("resize", cfg.resize), augment.get("crop", cfg.crop)
    return dataclasses.replace(cfg, resize=int(resize), crop=int(crop))


def extract_features(checkpoint: str, jpegs: list[bytes], cfg: FeatureConfig | None = None) -> np.ndarray:
    """Load ``backbone.pt`` with ``pretrain.model.load_backbone`` and embed ``jpegs``."""
    from pretrain.model import load_backbone

    return embed(load_backbone(checkpoint), jpegs, run_preprocessing(checkpoint, cfg or FeatureConfig()))


def throughput(checkpoint: str, jpegs: list[bytes], cfg: FeatureConfig) -> float:
    """Images per second of ``extract_features`` (decode + forward), after one warm-up batch."""
    from pretrain.model import load_backbone

    backbone = load_backbone(checkpoint)
    embed(backbone, jpegs[: cfg.batch_size], cfg)
    start = time.perf_counter()
    embed(backbone, jpegs, cfg)
    return len(jpegs) / (time.perf_counter() - start)

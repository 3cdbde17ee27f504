"""Encoder: a torchvision-style ResNet backbone plus the contrastive projection head.

Plain ``nn.Module`` objects: nothing here knows about DeepSpeed, ranks or devices.
``width`` scales the stem (64 in the paper's ResNets) so CPU smoke runs can use a 16-wide ResNet-18.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from common.errors import ConfigError

ARCH_LAYERS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


@dataclass
class ModelConfig:
    arch: Literal["resnet18", "resnet34", "resnet50"] = "resnet18"  # torchvision ResNet depth
    width: int = 64  # channels of the stem; 64 is torchvision's ResNet
    projector_dims: list[int] = field(default_factory=lambda: [512, 128])  # hidden..., output
    weights_path: str | None = None  # optional backbone state_dict to start from (no downloads)
    channels_last: bool = False  # memory format on GPU; harmless on CPU
    # Off by default: see docs/pretraining.md "Precision and compilation" for the measured speed on CPU ranks.
    compile: bool = False  # torch.compile (inductor) the encoder+projector in place; checkpoints unchanged

    def validate(self) -> None:

        if self.width < 4 or self.width % 4:
            raise ConfigError(f"config key 'model.width': must be a positive multiple of 4, got {self.width}")
        if not self.projector_dims or any(d <= 0 for d in self.projector_dims):
            raise ConfigError(
                f"config key 'model.projector_dims': positive sizes needed, got {self.projector_dims}"
            )
        if self.weights_path and not Path(self.weights_path).is_file():
            raise ConfigError(
                f"config key 'model.weights_path': file '{self.weights_path}' does not exist "
                "(give a local backbone state_dict, or null for random init)"
            )


class ResNetBackbone(ResNet):
    """torchvision ResNet with a configurable stem width and no classifier: returns pooled features."""

    def __init__(self, arch: str, width: int = 64):
        block, layers = ARCH_LAYERS[arch]
        super().__init__(block, layers)
        if width != 64:
            # Rebuild the trunk at another width, reusing torchvision's blocks and initialisation.
            self.inplanes = width
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.layer1 = self._make_layer(block, width, layers[0])
            self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
            self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
            self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
            for module in self.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(module, nn.BatchNorm2d):
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)
        self.feature_dim = width * 8 * block.expansion
        self.arch = arch
        self.width = width
        del self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def build_projector(in_dim: int, dims: list[int]) -> nn.Sequential:
    """SimCLR head: (Linear-BN-ReLU) per hidden size, then a plain Linear to the embedding size."""
    layers: list[nn.Module] = []
    prev = in_dim
    for hidden in dims[:-1]:
        layers += [nn.Linear(prev, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        prev = hidden
    layers.append(nn.Linear(prev, dims[-1]))
    return nn.Sequential(*layers)


class ContrastiveEncoder(nn.Module):
    """Backbone + projector; ``forward`` returns un-normalised embeddings (the loss normalises)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.backbone = build_backbone(cfg)
        self.projector = build_projector(self.backbone.feature_dim, list(cfg.projector_dims))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(images))


def compile_in_place(model: nn.Module) -> nn.Module:
    """``torch.compile`` ``model`` with inductor, in place (``nn.Module.compile``), and return it.

    In place rather than ``torch.compile(model)``: the module keeps its class and its ``state_dict`` keys (no
    ``_orig_mod.`` prefix), so checkpoints, resume and ``backbone.pt`` are the same with and without it.
    ``dynamic=False``: every batch of a run has one shape, and a shape change recompiles for that shape instead
    of switching to slower shape-generic kernels. Compiled code is cached on disk (:func:`inductor_cache_dir`),
    so a repeat run with the same model reuses it.
    """
    cache = inductor_cache_dir()
    if cache is not None:  # read by inductor at each cache access, so setting it now still takes effect
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    model.compile(backend="inductor", dynamic=False)
    return model


def inductor_cache_dir() -> Path | None:
    """Where inductor keeps compiled kernels: the user's ``TORCHINDUCTOR_CACHE_DIR``, else ``torchinductor``
    next to ``TORCH_EXTENSIONS_DIR`` (the Makefile and the tests put that in the checkout's ``.cache/``), else
    None (torch's default, a folder under the system temp dir)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # Importing torch._dynamo already wrote torch's default into the environment: that one is not the user's.
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current and os.path.abspath(current) != os.path.abspath(default_cache_dir()):
        return Path(current)
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(extensions).parent / "torchinductor" if extensions else None


def build_backbone(cfg: ModelConfig) -> ResNetBackbone:
    backbone = ResNetBackbone(cfg.arch, cfg.width)
    if cfg.weights_path:
        state = torch.load(cfg.weights_path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        backbone.load_state_dict(state)
    return backbone


def save_backbone(backbone: nn.Module, path: str | Path) -> Path:
    """A plain fp32 ``state_dict`` on CPU: what evaluation loads."""
    path = Path(path)
    state = {
        k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.cpu()
        for k, v in backbone.state_dict().items()
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def infer_model_config(state: dict[str, torch.Tensor]) -> ModelConfig:
    """Recover arch and width from a backbone state_dict (block counts and stem channels)."""
    width = int(state["conv1.weight"].shape[0])
    bottleneck = any(k.endswith("conv3.weight") for k in state)
    blocks = [len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5)]
    for arch, (block, layers) in ARCH_LAYERS.items():
        if layers == blocks and (block is Bottleneck) == bottleneck:
            return ModelConfig(arch=arch, width=width)
    raise ValueError(
        f"backbone state_dict matches no known arch (blocks per stage {blocks}, bottleneck={bottleneck})"
    )


def load_backbone(path: str | Path) -> ResNetBackbone:
    """Load ``backbone.pt`` (plain state_dict) into the matching architecture, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"backbone file '{path}' does not exist (pretraining writes RUN_DIR/backbone.pt)"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    backbone = ResNetBackbone(
        **{k: v for k, v in vars(infer_model_config(state)).items() if k in ("arch", "width")}
    )
    backbone.load_state_dict(state)
    return backbone.eval()

"""The two model families of the Fashion-MNIST benchmark, in plain torch, for ``(N, 1, 28, 28)`` grey images.

- :class:`ResNet18`: the CIFAR-style ResNet-18 of the RESQUE paper (3x3 stem, no max-pool, BasicBlocks
  ``[2, 2, 2, 2]``, global average pooling, one linear head ``linear``) with the width reduced to ``width`` base
  channels (``width, 2 width, 4 width, 8 width`` per stage; 8 by default, i.e. 1/8 of the paper's 64) and a
  one-channel stem: the images stay 28x28 grey (not resized to 32x32 RGB). Spatial sizes per stage: 28, 14, 7, 4.
  The representation layer is :data:`RESNET_LAYER` ``"layer4.1.conv2"``: output ``(N, 8 width, 4, 4)``, taken
  before its batch norm, residual add and ReLU, as the reference code hooks it.
- :class:`ViT`: a small Vision Transformer: 4x4 patches (49 tokens of width ``dim``), learned positions, ``depth``
  pre-norm blocks, a final LayerNorm ``norm`` whose ``(N, 49, dim)`` token output is the representation layer
  (:data:`VIT_LAYER`; the product mean-pools it over the tokens), token mean into a linear head ``head``.

:func:`make_model` builds either family with a seed; :func:`replace_head` gives a model a new linear head for a new
task (the whole network stays trainable, as in the paper).
"""

from __future__ import annotations

import torch
from torch import nn

RESNET_LAYER = "layer4.1.conv2"
VIT_LAYER = "norm"
FAMILIES = ("resnet18", "vit")
LAYERS = {"resnet18": RESNET_LAYER, "vit": VIT_LAYER}
HEADS = {"resnet18": "linear", "vit": "head"}


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18 of reduced width: ``(N, 1, 28, 28)`` -> logits ``(N, num_classes)``."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        widths, c_in, layers = (width, 2 * width, 4 * width, 8 * width), width, []
        for i, c in enumerate(widths):
            layers.append(nn.Sequential(BasicBlock(c_in, c, 1 if i == 0 else 2), BasicBlock(c, c, 1)))
            c_in = c
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(8 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(out.mean((2, 3)))


class Block(nn.Module):
    """Pre-norm transformer block: multi-head self-attention, then an MLP, each with a residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = torch.softmax((q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5, dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(n, t, d))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Small ViT: ``(N, 1, 28, 28)`` -> 49 patch tokens of width ``dim`` -> ``depth`` blocks -> LayerNorm ``norm``
    ``(N, 49, dim)`` -> token mean -> logits ``(N, num_classes)``."""

    def __init__(self, num_classes: int = 10, *, patch: int = 4, dim: int = 64, depth: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(1, dim, patch, patch)
        self.pos = nn.Parameter(torch.randn(1, (28 // patch) ** 2, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos
        x = self.norm(self.blocks(x))
        return self.head(x.mean(1))


def make_model(family: str, num_classes: int = 10, seed: int = 0, width: int = 8) -> nn.Module:
    """A freshly initialised model of ``family`` (``"resnet18"`` or ``"vit"``), seeded, in train mode."""
    torch.manual_seed(seed)
    if family == "resnet18":
        return ResNet18(num_classes, width=width)
    if family == "vit":
        return ViT(num_classes)
    raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")


def replace_head(model: nn.Module, family: str, num_classes: int, seed: int = 0) -> nn.Module:
    """``model`` with a new, seeded linear head of ``num_classes`` outputs (in place; returned for chaining)."""
    name = HEADS[family]
    old: nn.Linear = getattr(model, name)
    torch.manual_seed(seed)
    setattr(model, name, nn.Linear(old.in_features, num_classes))
    return model


def n_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

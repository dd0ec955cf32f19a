"""The benchmark's models, written in plain torch (torchvision is not installable beside this torch).

- :func:`resnet18_cifar`: the CIFAR-style ResNet-18 of the RESQUE paper's experiments: 3x3 stem, no max-pool,
  BasicBlocks ``[2, 2, 2, 2]`` with 64, 128, 256, 512 channels, global average pooling, one linear head. Input
  ``(N, 3, 32, 32)``; the representation layer is ``layer4.1.conv2`` (output ``(N, 512, 4, 4)``, taken before its
  batch norm, residual add and ReLU, as the reference code hooks it).
- :func:`vit_small`: a small Vision Transformer: 4x4 patches of a 32x32 image (64 tokens), width 192, depth 6,
  3 heads, MLP ratio 4, pre-norm blocks, a final LayerNorm ``norm`` whose ``(N, T, D)`` output is the
  representation layer, mean-pooled tokens into a linear head (no class token).

Random weights are fine for throughput: the cost of a forward pass does not depend on the weights' values.
"""

from __future__ import annotations

import torch
from torch import nn

RESNET_LAYER = "layer4.1.conv2"
VIT_LAYER = "norm"


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
    """CIFAR ResNet-18: ``(N, 3, 32, 32)`` -> logits ``(N, num_classes)``."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        widths, c_in, layers = (64, 128, 256, 512), 64, []
        for i, c in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(c_in, c, stride), BasicBlock(c, c, 1)))
            c_in = c
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(out.mean((2, 3)))


class Block(nn.Module):
    """Pre-norm transformer block: multi-head self-attention, then an MLP, each with a residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4) -> None:
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
    """Small ViT: ``(N, 3, 32, 32)`` -> 64 patch tokens of width ``dim`` -> ``depth`` blocks -> LayerNorm ``norm``
    ``(N, 64, dim)`` -> token mean -> logits ``(N, num_classes)``."""

    def __init__(
        self, num_classes: int = 10, *, image: int = 32, patch: int = 4, dim: int = 192, depth: int = 6, heads: int = 3
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos
        x = self.norm(self.blocks(x))
        return self.head(x.mean(1))


def _randomise_batchnorm(model: nn.Module, seed: int) -> None:
    """Give batch norms non-trivial running statistics, so their folding into convolutions is exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def resnet18_cifar(num_classes: int = 10, seed: int = 0) -> ResNet18:
    """A randomly initialised CIFAR ResNet-18 in eval mode."""
    torch.manual_seed(seed)
    model = ResNet18(num_classes)
    _randomise_batchnorm(model, seed)
    return model.eval()


def vit_small(num_classes: int = 10, seed: int = 0) -> ViT:
    """A randomly initialised small ViT (patch 4, dim 192, depth 6, 3 heads) in eval mode."""
    torch.manual_seed(seed)
    return ViT(num_classes).eval()


MODELS = {"resnet18": (resnet18_cifar, RESNET_LAYER), "vit": (vit_small, VIT_LAYER)}

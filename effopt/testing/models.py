"""Small reference models written in plain torch, as users write them.

The ViT follows timm's `vision_transformer.py` layout (patch embed, CLS token, pre-norm blocks,
fused qkv) so that graphs captured from it look like graphs captured from timm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """timm-style attention; `qkv_spelling` picks how q, k, v are split off the fused projection,
    because timm used `qkv[0]` after a permute before it used `unbind` (TVM's relax_dynamo fails on the former)."""

    def __init__(self, dim: int, heads: int, qkv_spelling: str = "unbind", use_sdpa: bool = False):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.qkv_spelling, self.use_sdpa = qkv_spelling, use_sdpa

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.qkv_spelling == "index":
            q, k, v = qkv[0], qkv[1], qkv[2]
        else:
            q, k, v = qkv.unbind(0)
        if self.use_sdpa:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, **attn_kw):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, **attn_kw)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision transformer; defaults are ViT-S/16 at 224 (22M parameters)."""

    def __init__(self, img_size=224, patch=16, dim=384, depth=12, heads=6, num_classes=1000,
                 in_chans=3, **attn_kw):
        super().__init__()
        self.patch_embed = nn.Conv2d(in_chans, dim, patch, patch)
        n = (img_size // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, **attn_kw) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit_small(**kw) -> ViT:
    return ViT(**kw)


def vit_tiny_test(**kw) -> ViT:
    """A ViT small enough for unit tests: 32x32 images, 2 blocks."""
    cfg = dict(img_size=32, patch=8, dim=64, depth=2, heads=4, num_classes=10)
    cfg.update(kw)
    return ViT(**cfg)


class SmallCNN(nn.Module):
    """Conv-BN-ReLU stacks with a residual, pooling and a linear head: the BatchNorm-folding case."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.conv = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU6())
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.conv(x)
        x = self.down(x)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))

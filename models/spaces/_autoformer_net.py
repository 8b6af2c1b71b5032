"""The standalone AutoFormer subnet as PyTorch modules (imported lazily: it needs torch)."""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

from models.spaces.autoformer import AutoFormerArch, AutoFormerConfig, mlp_hidden_dim


class PatchEmbedding(nn.Module):
    """Non-overlapping patches projected by one strided convolution; returns B x patches x embed_dim tokens."""

    def __init__(self, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class AttentionProducts(nn.Module):
    """softmax(Q K^T / sqrt(d)) V for B x heads x tokens x d tensors.

    It is a module of its own so that forward hooks see both matrix products, which the
    FLOPs count includes.
    """

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.scale = head_dim ** -0.5

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        weights = (query @ key.transpose(-2, -1)) * self.scale
        return weights.softmax(dim=-1) @ value


class MultiHeadAttention(nn.Module):
    def __init__(self, embed_dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        self.qkv = nn.Linear(embed_dim, 3 * heads * head_dim)
        self.products = AttentionProducts(head_dim)
        self.proj = nn.Linear(heads * head_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = self.products(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, self.heads * self.head_dim))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(LayerNorm(x)), then x + MLP(LayerNorm(x)) with GELU."""

    def __init__(self, embed_dim: int, heads: int, mlp_ratio: float, head_dim: int) -> None:
        super().__init__()
        hidden = mlp_hidden_dim(embed_dim, mlp_ratio)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.attn = MultiHeadAttention(embed_dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(embed_dim)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class AutoFormerNetwork(nn.Module):
    """Patch embedding, class token and position embedding, transformer blocks, LayerNorm, linear head.

    `blocks` are the feature taps, in order. Block l maps the tokens that block l-1 output
    (the embedded patches with class token and position embedding for the first) to its
    own, as a B x tokens x embed_dim tensor.
    """

    def __init__(self, arch: AutoFormerArch, config: AutoFormerConfig, *, head_dim: int, patch_size: int) -> None:
        super().__init__()
        embed = arch.embed_dim
        self.config = config
        self.patch_embed = PatchEmbedding(embed, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, embed))
        self.blocks = nn.ModuleList(TransformerBlock(embed, heads, ratio, head_dim) for heads, ratio in arch.layers)
        self.norm = nn.LayerNorm(embed)
        self.head = nn.Linear(embed, config.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # The initialisation of AutoFormer's code: truncated N(0, 0.02) for linear layers and
        # embeddings, zero biases, LayerNorm at identity. The patch convolution keeps
        # PyTorch's default.
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def feature_taps(self) -> List[Tuple[str, nn.Module]]:
        return [(f"blocks.{i}", block) for i, block in enumerate(self.blocks)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the normalised tokens, B x tokens x embed_dim, class token first."""
        tokens = self.patch_embed(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = torch.cat((cls, tokens), dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

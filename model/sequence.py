"""SASRec: a causal self-attention encoder over the history's item vectors.

Interface shared by every sequence model: forward(item_vectors [B, L, D], padding_mask [B, L] bool, True = real)
-> [B, L, D], causal; histories are left-padded, so the user state is output[:, -1].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from encoders.dropout import Dropout, dropout


class CausalSelfAttentionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float, ffn_multiplier: int = 4) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = ffn_multiplier * dim
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), Dropout(dropout), nn.Linear(hidden, dim))
        self.dropout = Dropout(dropout)
        self.attn_dropout = dropout

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """x [B, L, D], attn_mask [B, 1, L, L] bool (True = may attend) -> [B, L, D]; `last_only`: only the
        last position's output [B, 1, D] (its query, projection and feed-forward; keys and values need all)."""
        b, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, length, 3, self.num_heads, dim // self.num_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, hd]
        if last_only:
            q, attn_mask, x, length = q[:, :, -1:], attn_mask[:, :, -1:], x[:, -1:], 1
        if self.training and self.attn_dropout > 0 and x.device.type == "cpu":
            # SDPA's own dropout draws a Bernoulli sample per weight (slow on CPU): the same attention, spelled out
            weights = (q @ k.transpose(-2, -1)).mul_(1 / math.sqrt(q.shape[-1]))
            weights = weights.masked_fill(~attn_mask, float("-inf")).softmax(dim=-1)
            attended = dropout(weights, self.attn_dropout) @ v
        else:
            attended = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.attn_dropout if self.training else 0.0
            )
        x = x + self.dropout(self.out(attended.transpose(1, 2).reshape(b, length, dim)))
        return x + self.dropout(self.ffn(self.norm2(x)))


class SASRec(nn.Module):
    def __init__(self, *, dim: int, max_len: int, num_layers: int = 2, num_heads: int = 2, dropout: float = 0.2,
                 ffn_multiplier: int = 4) -> None:
        super().__init__()
        self.max_len = max_len
        self.positions = nn.Embedding(max_len, dim)
        nn.init.normal_(self.positions.weight, std=0.02)
        self.input_dropout = Dropout(dropout)
        self.blocks = nn.ModuleList(
            CausalSelfAttentionBlock(dim, num_heads, dropout, ffn_multiplier) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, item_vectors: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """item_vectors [B, L, D], padding_mask [B, L] bool -> [B, L, D]"""
        x, mask = self._inputs(item_vectors, padding_mask)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def _inputs(self, item_vectors: torch.Tensor, padding_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (the first block's input [B, L, D], the attention mask [B, 1, L, L])"""
        b, length, _ = item_vectors.shape
        if length > self.max_len:
            raise ValueError(f"history length {length} > max_len {self.max_len}")
        # Left padding: position index counts from the end so "most recent" always has the same embedding.
        pos = torch.arange(self.max_len - length, self.max_len, device=item_vectors.device)
        x = self.input_dropout(item_vectors + self.positions(pos)[None])
        x = x * padding_mask[..., None]
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        # A query may see real keys at or before it, and always itself (so padded rows never get an all-masked
        # softmax, which would be NaN); real positions therefore never see padding.
        eye = torch.eye(length, dtype=torch.bool, device=x.device)
        mask = (causal[None] & padding_mask[:, None, :]) | eye[None]  # [B, L, L]
        return x, mask[:, None]  # [B, 1, L, L]

    def last_state(self, item_vectors: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """``forward(...)[:, -1]`` [B, D] (the user state), the last block computed for the last query only."""
        x, mask = self._inputs(item_vectors, padding_mask)
        for block in self.blocks[:-1]:
            x = block(x, mask)
        return self.norm(self.blocks[-1](x, mask, last_only=True)[:, -1])

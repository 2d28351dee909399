"""The Linear Recurrent Unit sequence model (Orvieto et al. 2023; LRURec, Yue et al. 2024).

This module owns the LRU recurrence, its two scans and the LRU sequence model:

    h_t = lambda * h_{t-1} + gamma * (B x_t)         (diagonal, complex, per state channel)
    y_t = Re(C h_t) + D * x_t

with ``lambda = exp(-exp(nu_log) + i * exp(theta_log))`` ring-initialised so that
``|lambda|`` lies in ``[r_min, r_max]`` (< 1: stable) and ``gamma`` starts at the
normalisation ``sqrt(1 - |lambda|^2)`` that keeps the state's scale independent of
``|lambda|``.

``lru_scan_reference`` is the plain loop over time; ``lru_scan_parallel`` is a log-depth
associative scan (what makes the LRU train like a transformer); tests compare them.

With Matryoshka sizes the LRU stays full width (Kusupati et al.'s MRL): only the loss and the item projection
nest. fMRLRec's nested LRU (block-triangular B, C and feed-forward, per-block LayerNorms) lost to it in
`bench/matryoshka.py` (BENCHMARKS.md, session 6) and was removed; it is in git history at e629acf.

``LRUSequenceModel`` implements the shared sequence-model interface:
``forward(item_vectors [B, L, D], padding_mask [B, L] bool, True = real) -> [B, L, D]``,
causal by construction. Histories are left-padded; padded inputs are zeroed before every
recurrence so the state stays exactly zero until the first real item.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from encoders.dropout import Dropout


__all__ = [
    "lru_scan_reference",
    "lru_scan_parallel",
    "LRU",
    "GatedFeedForward",
    "LRUBlock",
    "LRUSequenceModel",
]


def lru_scan_reference(lambdas: Tensor, inputs: Tensor) -> Tensor:
    """[H] complex, [B, L, H] complex -> [B, L, H]: h_t = lambdas * h_{t-1} + inputs_t, h_{-1} = 0."""
    state = torch.zeros_like(inputs[:, 0])
    states = []
    for t in range(inputs.shape[1]):
        state = lambdas * state + inputs[:, t]
        states.append(state)
    return torch.stack(states, dim=1)


def lru_scan_parallel(lambdas: Tensor, inputs: Tensor) -> Tensor:
    """[H] complex, [B, L, H] complex -> [B, L, H]: same as ``lru_scan_reference``, log-depth.

    Hillis-Steele inclusive scan over pairs (a, b) with (a1, b1) . (a2, b2) = (a1 a2, a2 b1 + b2).
    Because every step's ``a`` is the same ``lambdas``, after the round with offset d every
    position t >= d has composite ``a = lambdas ** d``, so only one power per round is kept
    ([H], squared each round) instead of an [L, H] tensor. Positions t < d are already final.
    Any L works (no padding to a power of two); work is O(L log L), depth O(log L).
    """
    states = inputs
    power = lambdas  # lambdas ** offset
    offset = 1
    length = inputs.shape[1]
    while offset < length:
        # Out-of-place so autograd sees each round as its own node.
        states = torch.cat(
            [states[:, :offset], power * states[:, :-offset] + states[:, offset:]], dim=1
        )
        power = power * power
        offset *= 2
    return states


class LRU(nn.Module):
    """One LRU layer: [B, L, D] real -> [B, L, D] real, with a state of ``state_dim`` complex channels."""

    def __init__(
        self,
        dim: int,
        state_dim: int | None = None,
        r_min: float = 0.8,
        r_max: float = 0.99,
        max_phase: float = 2 * math.pi,
        use_parallel_scan: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 <= r_min < r_max < 1.0:
            raise ValueError(f"need 0 <= r_min < r_max < 1 for a stable ring, got r_min={r_min}, r_max={r_max}")
        state_dim = state_dim or dim
        self.dim = dim
        self.state_dim = state_dim
        self.use_parallel_scan = use_parallel_scan

        # Ring initialisation: |lambda|^2 uniform in [r_min^2, r_max^2], so radii are uniform
        # over the ring's area; phase uniform in [0, max_phase]. Parametrised through logs of
        # -log|lambda| and the phase so |lambda| = exp(-exp(nu_log)) < 1 for any nu_log.
        u1 = torch.rand(state_dim)
        u2 = torch.rand(state_dim).clamp_min(1e-4)  # log(0) would make theta_log -inf
        radius_sq = u1 * (r_max**2 - r_min**2) + r_min**2
        nu = -0.5 * torch.log(radius_sq)
        self.nu_log = nn.Parameter(torch.log(nu))
        self.theta_log = nn.Parameter(torch.log(max_phase * u2))
        self.gamma_log = nn.Parameter(0.5 * torch.log(1.0 - radius_sq))  # log sqrt(1 - |lambda|^2)

        # Complex B [H, D] and C [D, H] kept as real/imag pairs (optimisers, weight decay and
        # checkpoints all handle real tensors); scaled like the paper's Glorot-style init.
        self.B_re = nn.Parameter(torch.randn(state_dim, dim) / math.sqrt(2 * dim))
        self.B_im = nn.Parameter(torch.randn(state_dim, dim) / math.sqrt(2 * dim))
        self.C_re = nn.Parameter(torch.randn(dim, state_dim) / math.sqrt(state_dim))
        self.C_im = nn.Parameter(torch.randn(dim, state_dim) / math.sqrt(state_dim))
        self.D = nn.Parameter(torch.randn(dim))

    def lambdas(self) -> Tensor:
        """[H] complex diagonal of the recurrence; |lambda| < 1 always."""
        return torch.exp(torch.complex(-torch.exp(self.nu_log), torch.exp(self.theta_log)))

    def forward(self, x: Tensor) -> Tensor:
        """[B, L, D] real -> [B, L, D] real. Zero inputs leave a zero state zero."""
        gain = torch.exp(self.gamma_log)[:, None]
        # x is real and only Re(C h) is used, so both projections run as real matmuls: B x = B_re x + i B_im x
        # (2 real products, not the 4 of a complex one) and Re(C h) = C_re Re(h) - C_im Im(h) (2, not 4).
        # `forward_complex` is the same map written with complex tensors; tests compare the two.
        drive = torch.complex(x @ (self.B_re * gain).T, x @ (self.B_im * gain).T)  # [B, L, H] complex
        scan = lru_scan_parallel if self.use_parallel_scan else lru_scan_reference
        states = scan(self.lambdas(), drive)  # [B, L, H]
        return states.real @ self.C_re.T - states.imag @ self.C_im.T + self.D * x

    def last(self, x: Tensor) -> Tensor:
        """[B, L, D] real -> [B, D]: ``forward(x)[:, -1]`` without the scan or the other positions' read-out.
        The last state is a weighted sum of the drives, h_{L-1} = sum_t lambda^(L-1-t) (B x_t)."""
        gain = torch.exp(self.gamma_log)[:, None]
        drive = torch.complex(x @ (self.B_re * gain).T, x @ (self.B_im * gain).T)  # [B, L, H] complex
        log_lambda = torch.complex(-torch.exp(self.nu_log), torch.exp(self.theta_log))  # [H]
        age = torch.arange(x.shape[1] - 1, -1, -1, device=x.device, dtype=self.nu_log.dtype)  # L-1 ... 0
        state = (drive * torch.exp(age[:, None] * log_lambda[None])).sum(1)  # [B, H]
        return state.real @ self.C_re.T - state.imag @ self.C_im.T + self.D * x[:, -1]

    def forward_complex(self, x: Tensor) -> Tensor:
        """[B, L, D] -> [B, L, D]: ``forward`` computed with complex B and C (reference for the real-matmul form)."""
        gain = torch.exp(self.gamma_log)[:, None]
        B = torch.complex(self.B_re, self.B_im) * gain  # [H, D]
        C = torch.complex(self.C_re, self.C_im)  # [D, H]
        states = lru_scan_reference(self.lambdas(), x.to(B.dtype) @ B.T)
        return (states @ C.T).real + self.D * x


class GatedFeedForward(nn.Module):
    """GELU-gated feed-forward (GEGLU): [*, D] -> [*, D].

    ``hidden_dim`` defaults to dim (square layers, as in fMRLRec's LRU).
    """

    def __init__(self, dim: int, hidden_dim: int | None = None, dropout: float = 0.1) -> None:
        super().__init__()
        hidden_dim = hidden_dim or dim
        self.gate, self.value, self.out = nn.Linear(dim, hidden_dim), nn.Linear(dim, hidden_dim), nn.Linear(hidden_dim, dim)
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """[*, D] -> [*, D]"""
        hidden = F.gelu(self.gate(x)) * self.value(x)
        return self.out(self.dropout(hidden))


class LRUBlock(nn.Module):
    """Pre-norm residual block: x + Dropout(LRU(LN(x))), then x + Dropout(FFN(LN(x))). [B, L, D] -> [B, L, D]."""

    def __init__(
        self,
        dim: int,
        dropout: float = 0.1,
        r_min: float = 0.8,
        r_max: float = 0.99,
        max_phase: float = 2 * math.pi,
        use_parallel_scan: bool = True,
        ffn_multiplier: int = 1,
    ) -> None:
        super().__init__()
        self.lru_norm = nn.LayerNorm(dim)
        self.lru = LRU(dim, r_min=r_min, r_max=r_max, max_phase=max_phase, use_parallel_scan=use_parallel_scan)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = GatedFeedForward(dim, ffn_multiplier * dim, dropout=dropout)
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor, padding_mask: Tensor) -> Tensor:
        """[B, L, D], [B, L] bool (True = real) -> [B, L, D]"""
        real = padding_mask.unsqueeze(-1).to(x.dtype)
        # LayerNorm maps a zero padded vector to its bias, not zero: re-zero padded
        # positions so the recurrence state is still exactly zero at the first real item.
        x = x + self.dropout(self.lru(self.lru_norm(x) * real))
        x = x + self.dropout(self.ffn(self.ffn_norm(x)))
        return x * real

    def last(self, x: Tensor, padding_mask: Tensor) -> Tensor:
        """``forward(x, padding_mask)[:, -1]`` [B, D], with the read-out and feed-forward at the last position only."""
        real = padding_mask.unsqueeze(-1).to(x.dtype)
        last = x[:, -1] + self.dropout(self.lru.last(self.lru_norm(x) * real))
        last = last + self.dropout(self.ffn(self.ffn_norm(last)))
        return last * real[:, -1]


class LRUSequenceModel(nn.Module):
    """Stack of LRU blocks behind the sequence-model interface.

    ``forward(item_vectors [B, L, D], padding_mask [B, L] bool) -> [B, L, D]``; output t
    depends only on inputs <= t, padded outputs are zero, user state is ``output[:, -1]``.
    ``max_len`` is accepted for the shared interface; a recurrence needs no position table,
    so longer sequences still run. ``ffn_multiplier`` 1: square feed-forward layers, as in fMRLRec
    (4 x dim costs twice the CPU time per step at dim 512 for no measured gain; BENCHMARKS.md session 5).
    """

    def __init__(
        self,
        dim: int,
        max_len: int,
        num_layers: int = 1,
        dropout: float = 0.1,
        r_min: float = 0.8,
        r_max: float = 0.99,
        max_phase: float = 6.283,
        use_parallel_scan: bool = True,
        ffn_multiplier: int = 1,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.max_len = max_len
        self.input_norm = nn.LayerNorm(dim)
        self.input_dropout = Dropout(dropout)
        self.blocks = nn.ModuleList(
            LRUBlock(dim, dropout, r_min, r_max, max_phase, use_parallel_scan, ffn_multiplier)
            for _ in range(num_layers)
        )

    def forward(self, item_vectors: Tensor, padding_mask: Tensor) -> Tensor:
        """[B, L, D], [B, L] bool (True = real item) -> [B, L, D]"""
        x = self._inputs(item_vectors, padding_mask)
        for block in self.blocks:
            x = block(x, padding_mask)
        return x

    def last_state(self, item_vectors: Tensor, padding_mask: Tensor) -> Tensor:
        """``forward(...)[:, -1]`` [B, D] (the user state), the last block computed at the last position only."""
        x = self._inputs(item_vectors, padding_mask)
        for block in self.blocks[:-1]:
            x = block(x, padding_mask)
        return self.blocks[-1].last(x, padding_mask)

    def _inputs(self, item_vectors: Tensor, padding_mask: Tensor) -> Tensor:
        if item_vectors.shape[:2] != padding_mask.shape:
            raise ValueError(
                f"item_vectors {tuple(item_vectors.shape)} and padding_mask {tuple(padding_mask.shape)} disagree on [B, L]"
            )
        if item_vectors.shape[-1] != self.dim:
            raise ValueError(f"expected item vectors of width {self.dim}, got {item_vectors.shape[-1]}")
        real = padding_mask.unsqueeze(-1).to(item_vectors.dtype)
        return self.input_dropout(self.input_norm(item_vectors)) * real

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

Nested (fMRLRec): given Matryoshka ``sizes``, every layer is block-lower-triangular over those sizes -- the
LRU's B (state block k reads the input prefix ``x[..., :s_k]``) and C (output block k reads the state prefix),
the feed-forward's ``MatryoshkaLinear`` layers (hidden sizes scaled by ``ffn_multiplier``) and per-block
LayerNorms -- so the first s outputs of the whole model are exactly a size-s LRU model run on the first s
inputs, with the same parameters. ``forward(..., size=s)`` runs that size-s model alone (s-wide compute: how a
small size is served).

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

from matryoshka.layers import MatryoshkaLayerNorm, MatryoshkaLinear, nested_mask, scale_sizes, validate_sizes

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


def _check_nested(sizes: tuple[int, ...], size: int | None, owner: str) -> None:
    if size is None or size in sizes:
        return
    if not sizes:
        raise ValueError(f"{owner} is not nested (built without sizes): it runs at full width only, not size {size}")
    raise ValueError(f"{owner} runs at its nested sizes {list(sizes)} only, not at size {size}")


def _norm(dim: int, sizes: tuple[int, ...]) -> nn.Module:
    return MatryoshkaLayerNorm(dim, sizes) if sizes else nn.LayerNorm(dim)


def _run_norm(norm: nn.Module, x: Tensor, size: int | None) -> Tensor:
    return norm(x) if size is None else norm.forward_prefix(x, size)


class LRU(nn.Module):
    """One LRU layer: [B, L, D] real -> [B, L, D] real, with a state of ``state_dim`` complex channels.

    With ``sizes`` (nested), the state has ``dim`` channels split into the same blocks as the input, and
    ``forward(x[..., :s], size=s)`` equals ``forward(x)[..., :s]``.
    """

    def __init__(
        self,
        dim: int,
        state_dim: int | None = None,
        r_min: float = 0.8,
        r_max: float = 0.99,
        max_phase: float = 2 * math.pi,
        use_parallel_scan: bool = True,
        sizes: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        if not 0.0 <= r_min < r_max < 1.0:
            raise ValueError(f"need 0 <= r_min < r_max < 1 for a stable ring, got r_min={r_min}, r_max={r_max}")
        self.sizes = validate_sizes(sizes, dim, require_full=True) if sizes else ()
        if self.sizes and state_dim not in (None, dim):
            raise ValueError(f"a nested LRU needs state_dim == dim ({dim}), got {state_dim}")
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

        # Which inputs each state channel reads (B) and which states each output reads (C): all of them, or,
        # nested, the prefix of its block. Not saved: rebuilt from `sizes`.
        if self.sizes:
            b_mask, c_mask = nested_mask(self.sizes, self.sizes, dim), nested_mask(self.sizes, self.sizes, dim)
        else:
            b_mask, c_mask = torch.ones(state_dim, dim), torch.ones(dim, state_dim)
        self.register_buffer("b_mask", b_mask, persistent=False)  # [H, D]
        self.register_buffer("c_mask", c_mask, persistent=False)  # [D, H]
        # Complex B [H, D] and C [D, H] kept as real/imag pairs (optimisers, weight decay and
        # checkpoints all handle real tensors); scaled like the paper's Glorot-style init, with each
        # row's own fan-in (all of D, or its block's prefix when nested).
        b_fan_in, c_fan_in = b_mask.sum(1, keepdim=True), c_mask.sum(1, keepdim=True)
        self.B_re = nn.Parameter(torch.randn(state_dim, dim) / torch.sqrt(2 * b_fan_in) * b_mask)
        self.B_im = nn.Parameter(torch.randn(state_dim, dim) / torch.sqrt(2 * b_fan_in) * b_mask)
        self.C_re = nn.Parameter(torch.randn(dim, state_dim) / torch.sqrt(c_fan_in) * c_mask)
        self.C_im = nn.Parameter(torch.randn(dim, state_dim) / torch.sqrt(c_fan_in) * c_mask)
        self.D = nn.Parameter(torch.randn(dim))

    def lambdas(self) -> Tensor:
        """[H] complex diagonal of the recurrence; |lambda| < 1 always."""
        return torch.exp(torch.complex(-torch.exp(self.nu_log), torch.exp(self.theta_log)))

    def forward(self, x: Tensor, size: int | None = None) -> Tensor:
        """[B, L, D] real -> [B, L, D] real; nested, ``size=s``: [B, L, s] -> [B, L, s] (the size-s LRU).

        Zero inputs leave a zero state zero.
        """
        _check_nested(self.sizes, size, "this LRU")
        out, state = (self.dim, self.state_dim) if size is None else (size, size)
        b_mask, c_mask = self.b_mask[:state, :out], self.c_mask[:out, :state]
        gain = torch.exp(self.gamma_log[:state])[:, None]
        # x is real and only Re(C h) is used, so both projections run as real matmuls: B x = B_re x + i B_im x
        # (2 real products, not the 4 of a complex one) and Re(C h) = C_re Re(h) - C_im Im(h) (2, not 4).
        # `forward_complex` is the same map written with complex tensors; tests compare the two.
        drive = torch.complex(x @ (self.B_re[:state, :out] * b_mask * gain).T,
                              x @ (self.B_im[:state, :out] * b_mask * gain).T)  # [B, L, H] complex
        scan = lru_scan_parallel if self.use_parallel_scan else lru_scan_reference
        states = scan(self.lambdas()[:state], drive)  # [B, L, H]
        C_re, C_im = self.C_re[:out, :state] * c_mask, self.C_im[:out, :state] * c_mask  # [D, H]
        return states.real @ C_re.T - states.imag @ C_im.T + self.D[:out] * x

    def forward_complex(self, x: Tensor) -> Tensor:
        """[B, L, D] -> [B, L, D]: ``forward`` computed with complex B and C (reference for the real-matmul form)."""
        gain = torch.exp(self.gamma_log)[:, None]
        B = torch.complex(self.B_re * self.b_mask, self.B_im * self.b_mask) * gain  # [H, D]
        C = torch.complex(self.C_re * self.c_mask, self.C_im * self.c_mask)  # [D, H]
        states = lru_scan_reference(self.lambdas(), x.to(B.dtype) @ B.T)
        return (states @ C.T).real + self.D * x


class GatedFeedForward(nn.Module):
    """GELU-gated feed-forward (GEGLU): [*, D] -> [*, D]; nested with ``sizes`` (hidden sizes scaled alike).

    ``hidden_dim`` defaults to 4 * dim (the transformer convention); fMRLRec's LRU uses dim (square layers).
    """

    def __init__(self, dim: int, hidden_dim: int | None = None, dropout: float = 0.1,
                 sizes: tuple[int, ...] = ()) -> None:
        super().__init__()
        hidden_dim = hidden_dim or 4 * dim
        self.sizes = validate_sizes(sizes, dim, require_full=True) if sizes else ()
        if self.sizes:
            self.hidden_sizes = scale_sizes(self.sizes, dim, hidden_dim)
            self.gate = MatryoshkaLinear(dim, hidden_dim, self.hidden_sizes, in_sizes=self.sizes)
            self.value = MatryoshkaLinear(dim, hidden_dim, self.hidden_sizes, in_sizes=self.sizes)
            self.out = MatryoshkaLinear(hidden_dim, dim, self.sizes, in_sizes=self.hidden_sizes)
        else:
            self.hidden_sizes = ()
            self.gate, self.value, self.out = nn.Linear(dim, hidden_dim), nn.Linear(dim, hidden_dim), nn.Linear(hidden_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, size: int | None = None) -> Tensor:
        """[*, D] -> [*, D]; nested, ``size=s``: [*, s] -> [*, s]."""
        _check_nested(self.sizes, size, "this feed-forward layer")
        if size is None:
            hidden = F.gelu(self.gate(x)) * self.value(x)
            return self.out(self.dropout(hidden))
        width = self.hidden_sizes[self.sizes.index(size)]
        hidden = F.gelu(self.gate.forward_prefix(x, width)) * self.value.forward_prefix(x, width)
        return self.out.forward_prefix(self.dropout(hidden), size)


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
        sizes: tuple[int, ...] = (),
        ffn_multiplier: int = 4,
    ) -> None:
        super().__init__()
        self.lru_norm = _norm(dim, sizes)
        self.lru = LRU(dim, r_min=r_min, r_max=r_max, max_phase=max_phase, use_parallel_scan=use_parallel_scan,
                       sizes=sizes)
        self.ffn_norm = _norm(dim, sizes)
        self.ffn = GatedFeedForward(dim, ffn_multiplier * dim, dropout=dropout, sizes=sizes)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, padding_mask: Tensor, size: int | None = None) -> Tensor:
        """[B, L, D], [B, L] bool (True = real) -> [B, L, D]; nested, ``size=s``: [B, L, s] -> [B, L, s]."""
        real = padding_mask.unsqueeze(-1).to(x.dtype)
        # LayerNorm maps a zero padded vector to its bias, not zero: re-zero padded
        # positions so the recurrence state is still exactly zero at the first real item.
        x = x + self.dropout(self.lru(_run_norm(self.lru_norm, x, size) * real, size))
        x = x + self.dropout(self.ffn(_run_norm(self.ffn_norm, x, size), size))
        return x * real


class LRUSequenceModel(nn.Module):
    """Stack of LRU blocks behind the sequence-model interface.

    ``forward(item_vectors [B, L, D], padding_mask [B, L] bool) -> [B, L, D]``; output t
    depends only on inputs <= t, padded outputs are zero, user state is ``output[:, -1]``.
    ``max_len`` is accepted for the shared interface; a recurrence needs no position table,
    so longer sequences still run. With ``sizes`` the whole stack is nested (module docstring):
    ``forward(item_vectors[..., :s], padding_mask, size=s) == forward(item_vectors, padding_mask)[..., :s]``.
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
        sizes: tuple[int, ...] = (),
        ffn_multiplier: int = 4,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.max_len = max_len
        self.sizes = validate_sizes(sizes, dim, require_full=True) if sizes else ()
        self.input_norm = _norm(dim, self.sizes)
        self.input_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            LRUBlock(dim, dropout, r_min, r_max, max_phase, use_parallel_scan, self.sizes, ffn_multiplier)
            for _ in range(num_layers)
        )

    def forward(self, item_vectors: Tensor, padding_mask: Tensor, size: int | None = None) -> Tensor:
        """[B, L, D], [B, L] bool (True = real item) -> [B, L, D]; nested, ``size=s``: [B, L, s] -> [B, L, s]."""
        if item_vectors.shape[:2] != padding_mask.shape:
            raise ValueError(
                f"item_vectors {tuple(item_vectors.shape)} and padding_mask {tuple(padding_mask.shape)} disagree on [B, L]"
            )
        _check_nested(self.sizes, size, "this LRU sequence model")
        width = self.dim if size is None else size
        if item_vectors.shape[-1] != width:
            raise ValueError(f"expected item vectors of width {width}, got {item_vectors.shape[-1]}")
        real = padding_mask.unsqueeze(-1).to(item_vectors.dtype)
        x = self.input_dropout(_run_norm(self.input_norm, item_vectors, size)) * real
        for block in self.blocks:
            x = block(x, padding_mask, size)
        return x

    def submodel(self, size: int) -> "LRUSequenceModel":
        """The size-s model as a standalone s-wide ``LRUSequenceModel`` (nested sizes up to s), its parameters
        copied from the prefixes of this one's: ``submodel(s)(x[..., :s], m) == self(x, m)[..., :s]``.

        Every parameter of a nested model is laid out so that the size-s model's copy is its leading
        sub-tensor (B, C and the feed-forward weights are block-triangular over prefixes; norms, D and the
        recurrence's lambdas are per channel), which is what lets one checkpoint be shipped at any size.
        """
        _check_nested(self.sizes, size, "this LRU sequence model")
        # The ring settings (r_min, r_max, max_phase) only initialise parameters that are copied over below.
        block = self.blocks[0]
        small = LRUSequenceModel(size, self.max_len, num_layers=len(self.blocks), dropout=self.input_dropout.p,
                                 use_parallel_scan=block.lru.use_parallel_scan,
                                 sizes=self.sizes[: self.sizes.index(size) + 1],
                                 ffn_multiplier=block.ffn.gate.out_features // self.dim)
        own = self.state_dict()
        small.load_state_dict({name: own[name][tuple(slice(0, n) for n in value.shape)]
                               for name, value in small.state_dict().items()})
        return small.train(self.training)

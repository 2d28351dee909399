"""Text encoders and their tokenizer: token ids [B, T] + attention mask [B, T] -> [B, out_dim].

This module owns tokenizer loading (one cached transformers tokenizer per process), turning
strings into fixed-width id/mask tensors, and the text backbones. Both encoders mean-pool
token states over the attention mask (as sentence-transformers does); neither L2-normalises,
so the fusion layer decides the scale. `unfreeze_top` follows
`encoders.config.apply_unfreeze_top`.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from encoders.config import (
    PartiallyTrainableEncoder,
    apply_unfreeze_top,
    find_block_list,
    frozen_block_count,
    keeps_dropout,
    modules_after,
    remove_dropout,
    resolve_text_model_path,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class _Stop(Exception):
    """Stops a forward pass once a hook has seen what it needed."""


@functools.lru_cache(maxsize=8)
def load_tokenizer(path_or_alias: str) -> PreTrainedTokenizerBase:
    """The transformers tokenizer at a directory, hub id or alias ("minilm"); loaded once per process."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_text_model_path(path_or_alias))


def tokenize_texts(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> dict[str, torch.Tensor]:
    """list of B strings -> {"input_ids": int64 [B, max_length], "attention_mask": int64 [B, max_length]}.

    Pads to exactly `max_length` so every batch has the same width (Ray Data tensor columns
    need a fixed shape). Empty strings give [CLS] [SEP] and are still encoded.
    """
    encoded = tokenizer(
        list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return {
        "input_ids": encoded["input_ids"].to(torch.int64),
        "attention_mask": encoded["attention_mask"].to(torch.int64),
    }


def masked_mean(token_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T, D] states, [B, T] 0/1 mask -> [B, D] mean over unmasked tokens (zeros if none)."""
    weights = attention_mask.unsqueeze(-1).to(token_states.dtype)  # [B, T, 1]
    total = (token_states * weights).sum(dim=1)  # [B, D]
    return total / weights.sum(dim=1).clamp(min=1.0)


class _ResidualMLP(nn.Module):
    """[B, D] -> [B, D]: x + Linear(GELU(Linear(LayerNorm(x))))."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features + self.down(nn.functional.gelu(self.up(self.norm(features))))


class _TextEncoder(PartiallyTrainableEncoder):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids int64 [B, T], attention_mask [B, T] -> [B, out_dim]: the trunk, then the trained top."""
        return super().forward(input_ids, attention_mask)


class TinyTextEncoder(_TextEncoder):
    """From-scratch bag-of-tokens encoder: embedding -> masked mean -> residual MLPs -> LayerNorm.

    Blocks for `unfreeze_top` are the residual MLPs; the head is the final LayerNorm; the token
    embedding trains only with unfreeze_top == -1.
    """

    def __init__(self, *, vocab_size: int, dim: int = 64, num_layers: int = 2, unfreeze_top: int = -1) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(_ResidualMLP(dim) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(dim)
        self.out_dim: int = dim
        self.unfreeze_top = unfreeze_top
        apply_unfreeze_top(self, self.blocks, [self.final_norm], unfreeze_top)
        self.frozen_blocks = frozen_block_count(len(self.blocks), unfreeze_top)
        self.train()

    def trunk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids int64 [B, T], attention_mask [B, T] -> the frozen part's output [B, dim] (the ids themselves
        when the embedding trains)."""
        if self.unfreeze_top == -1:
            return input_ids
        features = masked_mean(self.token_embedding(input_ids), attention_mask)  # [B, D]
        for block in self.blocks[: self.frozen_blocks]:
            features = block(features)
        return self.final_norm(features) if self.unfreeze_top == 0 else features

    def top(self, features: torch.Tensor, input_ids: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The trunk's output -> [B, dim]."""
        if self.unfreeze_top == 0:
            return features
        if self.unfreeze_top == -1:
            features = masked_mean(self.token_embedding(features), attention_mask)
        for block in self.blocks[self.frozen_blocks:]:
            features = block(features)
        return self.final_norm(features)

    def layer_widths(self) -> tuple[int, ...]:
        return (self.out_dim,) * (len(self.blocks) + 2)

    def layer_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """-> the pooled embeddings, each block's output, the final norm's (the encoder's output), [B, dim] each."""
        features = masked_mean(self.token_embedding(input_ids), attention_mask)
        outputs = [features]
        for block in self.blocks:
            features = block(features)
            outputs.append(features)
        return [*outputs, self.final_norm(features)]


class HFTextEncoder(_TextEncoder):
    """Any transformers text encoder (BERT, MiniLM, MPNet, RoBERTa, ...), mean-pooled.

    Blocks for `unfreeze_top` are the transformer layers; the head is any final norm after
    them. The model's own pooler (a [CLS] dense+tanh) is unused by mean pooling, so it is
    always frozen: trainable parameters that never get a gradient break DDP.
    """

    def __init__(self, *, path: str, unfreeze_top: int = -1) -> None:
        super().__init__()
        from transformers import AutoModel

        self.model = AutoModel.from_pretrained(resolve_text_model_path(path))
        self.out_dim: int = int(self.model.config.hidden_size)
        block_name, blocks = find_block_list(self.model)
        head = [module for name, module in modules_after(self.model, block_name) if name.split(".")[-1] != "pooler"]
        self.unfreeze_top = unfreeze_top
        apply_unfreeze_top(self, blocks, head, unfreeze_top)
        if not keeps_dropout(unfreeze_top):
            remove_dropout(self.model)  # MiniLM: 0.1 on attention weights and on each sublayer's output
        pooler = getattr(self.model, "pooler", None)
        if isinstance(pooler, nn.Module):
            pooler.requires_grad_(False)
        self.blocks, self.head = blocks, head
        self.frozen_blocks = frozen_block_count(len(blocks), unfreeze_top)
        self.train()

    def trunk_cache_unsupported(self) -> str:
        if 0 < self.unfreeze_top and self.head:
            return (f"text.kind=hf: {type(self.model).__name__} has layers after its blocks; only fully frozen "
                    "(text.unfreeze_top=0) is cached")
        return super().trunk_cache_unsupported()

    def _block_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      block: nn.Module) -> tuple[tuple, dict]:
        """The arguments the model passes to `block`, as its own forward builds them (attention mask format,
        position terms: these differ across transformers versions). The forward is stopped there."""
        seen: dict[str, tuple] = {}

        def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
            seen["inputs"] = (args, kwargs)
            raise _Stop

        handle = block.register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask)
        except _Stop:
            pass
        finally:
            handle.remove()
        return seen["inputs"]

    @property
    def _split(self) -> bool:
        """Whether forward runs as trunk + top layers (top layers train, nothing after them)."""
        return self.unfreeze_top > 0 and not self.head

    def trunk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids int64 [B, T], attention_mask [B, T] -> the frozen part's output: the hidden states entering
        the first trained layer [B, T, H], or the pooled [B, H] when nothing trains (the ids when not split)."""
        if self.unfreeze_top == 0:
            return self._full(input_ids, attention_mask)
        if not self._split:
            return input_ids
        args, kwargs = self._block_inputs(input_ids, attention_mask, self.blocks[self.frozen_blocks])
        return args[0] if args else kwargs["hidden_states"]

    def top(self, features: torch.Tensor, input_ids: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The trunk's output -> [B, hidden_size], mean-pooled over the attention mask."""
        if self.unfreeze_top == 0:
            return features
        if not self._split:
            return self._full(features, attention_mask)
        # the layers' other arguments (attention mask in the model's own format) as the model builds them: only
        # the embeddings run for it
        args, kwargs = self._block_inputs(input_ids, attention_mask, self.blocks[0])
        kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        hidden = features
        for block in self.blocks[self.frozen_blocks:]:
            out = block(hidden, *args[1:], **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return masked_mean(hidden, attention_mask)

    def layer_widths(self) -> tuple[int, ...]:
        return (self.out_dim,) * (len(self.blocks) + 1)

    def layer_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """-> the embeddings' and each layer's hidden states but the last, then the model's last hidden state (the
        encoder's output), each mean-pooled over the attention mask [B, H]."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        states = [*out.hidden_states[: len(self.blocks)], out.last_hidden_state]
        return [masked_mean(state, attention_mask) for state in states]

    def _full(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        token_states = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, H]
        return masked_mean(token_states, attention_mask)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().num_embeddings)


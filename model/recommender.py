"""The recommender: item encoder + sequence model, composed by injection.

One training forward pass (`forward`) encodes each distinct target item of the batch once (with gradients),
puts those fresh vectors in place of the cached (bank) vectors wherever the same item occurs in a history, and
returns user states and target item vectors. Scores are cosine similarities (vectors are L2-normalised).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from encoders.fusion import ItemEncoder


@dataclass
class StepOutput:
    user: torch.Tensor  # [B, D]
    positive: torch.Tensor  # [B, D]
    unique_ids: torch.Tensor  # [U] distinct target ids of the batch
    unique_content: torch.Tensor  # [U, D] their fresh content vectors (written back to the bank)


class Recommender(nn.Module):
    def __init__(self, *, item_encoder: ItemEncoder, sequence_model: nn.Module) -> None:
        super().__init__()
        self.item_encoder = item_encoder
        self.sequence_model = sequence_model

    def item_vectors(self, content: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """content [*, D] + id embedding of ids [*] -> normalised item vectors [*, D]"""
        return F.normalize(content + self.item_encoder.id_vectors(ids), dim=-1)

    def user_vectors(self, history_ids: torch.Tensor, history_content: torch.Tensor) -> torch.Tensor:
        """history_ids [B, L] (0 = padding), history_content [B, L, D] -> user states [B, D]"""
        vectors = self.item_vectors(history_content, history_ids) * (history_ids > 0)[..., None]
        states = self.sequence_model(vectors, history_ids > 0)
        return F.normalize(states[:, -1], dim=-1)

    def forward(
        self,
        *,
        target_ids: torch.Tensor,
        image: torch.Tensor,
        image_mask: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        text_mask: torch.Tensor,
        history_ids: torch.Tensor,
        history_content: torch.Tensor,
    ) -> StepOutput:
        """Batch of B examples (target content as decoded by the pipeline, cached history content [B, L, D])."""
        unique_ids, first_row, inverse = unique_first(target_ids)
        content = self.item_encoder.encode_content(
            image[first_row], image_mask[first_row], input_ids[first_row], attention_mask[first_row], text_mask[first_row]
        )  # [U, D]
        positive = self.item_vectors(content[inverse], target_ids)
        history_content = replace_with_fresh(history_ids, history_content, unique_ids, content)
        user = self.user_vectors(history_ids, history_content)
        return StepOutput(user=user, positive=positive, unique_ids=unique_ids, unique_content=content)


def unique_first(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [B] -> (unique ids [U] sorted, first row of each [U], inverse [B] so unique[inverse] == ids)"""
    unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    rows = torch.arange(ids.shape[0], device=ids.device)
    first = torch.full((unique.shape[0],), ids.shape[0], dtype=torch.long, device=ids.device)
    first = first.scatter_reduce(0, inverse, rows, reduce="amin")
    return unique, first, inverse


def replace_with_fresh(
    history_ids: torch.Tensor, history_content: torch.Tensor, fresh_ids: torch.Tensor, fresh_content: torch.Tensor
) -> torch.Tensor:
    """Where a history item was encoded this step, use its fresh vector instead of the cached one.

    history_ids [B, L], history_content [B, L, D], fresh_ids [U] sorted, fresh_content [U, D] -> [B, L, D]
    """
    if fresh_ids.numel() == 0:
        return history_content
    pos = torch.searchsorted(fresh_ids, history_ids).clamp(max=fresh_ids.shape[0] - 1)
    hit = (fresh_ids[pos] == history_ids) & (history_ids > 0)
    return torch.where(hit[..., None], fresh_content[pos], history_content)

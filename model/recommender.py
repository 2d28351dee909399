"""The recommender: item encoder + sequence model, composed by injection.

One training forward pass (`forward`) encodes each distinct target item of the batch once (with gradients),
puts those fresh vectors in place of the cached (bank) vectors wherever the same item occurs in a history, and
returns user states and target item vectors. Scores are cosine similarities (vectors are L2-normalised).

Matryoshka (MRL, as measured best in `bench/matryoshka.py`): with nested `matryoshka_sizes`, the item projection
is a block-lower-triangular `MatryoshkaLinear` (see `encoders/fusion.py`), the sequence model stays full width and
the user vector is its last state, so an item or user vector at size s is exactly the first s dims of the full
one *before* normalisation. Normalising happens after truncation (`at_size`): a size-s vector is
`normalize(raw[..., :s])`, which equals `normalize(normalize(raw)[..., :s])`, so full normalised vectors can be
truncated and renormalised later. `model.losses.NestedSizesLoss` trains every size at once on those truncated-then-renormalised
vectors. (fMRLRec's nested LRU, a Matryoshka user head and per-block normalisation lost to this and were removed;
BENCHMARKS.md sessions 5-8, code in git history at e629acf.)
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from encoders.fusion import ItemEncoder
from matryoshka.layers import at_size, truncate, validate_sizes  # noqa: F401 (at_size: used by importers)


@dataclass
class StepOutput:
    user: torch.Tensor  # [M, D] (M = B, or with all_positions every real history position)
    positive: torch.Tensor  # [M, D] the vector of the item each user state must rank first
    positive_ids: torch.Tensor  # [M] that item's id
    unique_ids: torch.Tensor  # [U] distinct target ids of the batch
    unique_content: torch.Tensor  # [U, D] their fresh content vectors (written back to the bank)


class Recommender(nn.Module):
    def __init__(self, *, item_encoder: ItemEncoder, sequence_model: nn.Module,
                 matryoshka_sizes: Sequence[int] = ()) -> None:
        super().__init__()
        self.item_encoder = item_encoder
        self.sequence_model = sequence_model  # full width; its last state is the user vector
        self.matryoshka_sizes = validate_sizes(matryoshka_sizes, item_encoder.dim, require_full=True) \
            if matryoshka_sizes else ()

    @property
    def supported_sizes(self) -> tuple[int, ...]:
        """Vector sizes this model serves: its Matryoshka sizes, or only the full dim."""
        return self.matryoshka_sizes or (self.item_encoder.dim,)

    def _check_size(self, size: int | None) -> None:
        if size is not None and size not in self.supported_sizes:
            raise ValueError(f"size {size} is not supported; this model serves sizes {list(self.supported_sizes)}")

    def raw_item_vectors(self, content: torch.Tensor, ids: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """content [*, >=size] + id embedding of ids [*] -> unnormalised item vectors [*, size or D]"""
        self._check_size(size)
        id_part = self.item_encoder.id_vectors(ids)
        if size is None:
            return content + id_part
        return truncate(content, size) + truncate(id_part, size)

    def item_vectors(self, content: torch.Tensor, ids: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """content [*, >=size] + id embedding of ids [*] -> normalised item vectors [*, size or D]"""
        return F.normalize(self.raw_item_vectors(content, ids, size), dim=-1)

    @torch.no_grad()
    def zero_unseen_ids(self, seen: torch.Tensor) -> int:
        """Zero the id vector of each item in no training example (`seen` False; rows past `seen`, items new since
        training, are unseen too; row 0, the padding, is zero already), so that it is scored by its content alone.
        -> how many rows were zeroed (0 without id embeddings or content, or without unseen items).

        Such a row gets no gradient (its item is in no example, and the full softmax leaves it out), so it would
        keep its random initial vector, noise added to its content. An ID-only model has no content to score by
        and is left as it is: one shared zero vector would tie every unseen item, and ties count in the target's
        favour in the evaluation (a cold target would rank first among the tied). Zero rather than the id vector
        a ridge fit content -> id predicts (the rule before): that row was close to the mean id vector (a warm
        item's id is orthogonal to its content), and scoring by content alone gave new items 16-51% more cold
        Recall@10 on each of six time-split runs at a level warm NDCG@10 (BENCHMARKS.md, session 27)."""
        table = self.item_encoder.id_embedding
        if table is None or not self.item_encoder.has_content:
            return 0
        unseen = torch.ones(len(table.weight), dtype=torch.bool, device=table.weight.device)
        known = min(len(seen), len(unseen))
        unseen[:known] = ~seen[:known].to(device=unseen.device, dtype=torch.bool)
        unseen[0] = False
        table.weight[unseen] = 0.0
        return int(unseen.sum())

    def raw_user_vectors(self, history_ids: torch.Tensor, history_content: torch.Tensor,
                         size: int | None = None) -> torch.Tensor:
        """history_ids [B, L] (0 = padding), history_content [B, L, D] -> unnormalised user vectors [B, size or D].

        The sequence model runs at full width; `size` truncates its last state.
        """
        self._check_size(size)
        real, vectors = self._history_vectors(history_ids, history_content)
        state = self.sequence_model.last_state(vectors, real)  # [B, D]: forward(...)[:, -1], computed for it
        return state if size is None else truncate(state, size)

    def _history_vectors(self, history_ids: torch.Tensor,
                         history_content: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (real [B, L] bool, the sequence model's input: item vectors, zero at padding [B, L, D])"""
        real = history_ids > 0
        return real, self.item_vectors(history_content, history_ids) * real[..., None]

    def user_vectors(self, history_ids: torch.Tensor, history_content: torch.Tensor,
                     size: int | None = None) -> torch.Tensor:
        """history_ids [B, L] (0 = padding), history_content [B, L, D] -> normalised user vectors [B, size or D]"""
        return F.normalize(self.raw_user_vectors(history_ids, history_content, size), dim=-1)

    def forward(
        self,
        *,
        target_ids: torch.Tensor,
        content: dict[str, torch.Tensor],
        history_ids: torch.Tensor,
        history_content: torch.Tensor,
        encode_mask: torch.Tensor | None = None,
        target_cached_content: torch.Tensor | None = None,
        history_item_content: dict[str, torch.Tensor] | None = None,
        all_positions: bool = False,
        content_table: torch.Tensor | None = None,
        candidate_table: torch.Tensor | None = None,
    ) -> StepOutput:
        """Batch of B examples: the targets' content [B, ...] per field, cached history content [B, L, D].

        `content` is either the decoded content (image, masks, tokens, as the pipeline delivers it) or the trunk
        fields of the targets (rows of `training.trunk_cache`); `ItemEncoder.encode_fields` takes both.
        encode_mask [B] bool (LEMUR's encoder sampling): only these rows' targets run the encoder; the others use
        `target_cached_content` [B, D] (bank vectors, no gradient). history_item_content (memory.mode=recompute):
        the same fields for every history item ([B, L, ...] per field); those items are then encoded too,
        with gradients, instead of read from the bank. Every distinct item is encoded once per step.
        all_positions (`train.targets=all`, SASRec's objective): every real history position's state is a user
        state too, whose positive is the next item (the next history item, or the target after the last); the
        history items' vectors are those the sequence model reads (fresh for targets and recomputed history, the
        bank's otherwise). The last position's row of each example comes last, in batch order.
        content_table [N+1, D] (memory.mode=catalogue): every item's content, made this step with gradients;
        targets and history items are read from it and nothing is encoded here (`content` and `history_content`
        are then not read). candidate_table [N+1, D]: the same items' content without the fusion's dropout (what
        the loss's candidates are): every positive (targets, and with all_positions the next history items) is
        read from it, so a positive is made as its competitors are; defaults to content_table.
        """
        # the positives' table: the candidates' one where it is another (without the fusion's dropout)
        scored = (content_table if candidate_table is None else candidate_table) if content_table is not None else None
        if scored is not None:
            ids = torch.cat([target_ids, history_ids.reshape(-1)])
            unique_ids = torch.unique(ids[ids > 0])  # sorted
            content_vectors = gather_rows(scored, unique_ids)
        else:
            unique_ids, content_vectors = self._encode_distinct(target_ids, content, history_ids, encode_mask,
                                                                history_item_content)
        if unique_ids.numel():
            pos = torch.searchsorted(unique_ids, target_ids).clamp(max=unique_ids.shape[0] - 1)
            encoded = unique_ids[pos] == target_ids
            fresh_targets = gather_rows(content_vectors, pos)
        else:
            encoded = torch.zeros_like(target_ids, dtype=torch.bool)
            fresh_targets = torch.zeros(target_ids.shape[0], self.item_encoder.dim, device=target_ids.device)
        if target_cached_content is not None:
            target_content = torch.where(encoded[:, None], fresh_targets, target_cached_content)
        else:
            target_content = fresh_targets
        positive = self.item_vectors(target_content, target_ids)
        history_content = gather_rows(content_table, history_ids) if content_table is not None \
            else replace_with_fresh(history_ids, history_content, unique_ids, content_vectors)
        if not all_positions:
            user = self.user_vectors(history_ids, history_content)
            return StepOutput(user=user, positive=positive, positive_ids=target_ids, unique_ids=unique_ids,
                              unique_content=content_vectors)
        real, vectors = self._history_vectors(history_ids, history_content)
        states = F.normalize(self.sequence_model(vectors, real), dim=-1)
        # position i (< L-1) predicts history item i+1; it is real whenever item i is (histories are left-padded)
        inner = real[:, :-1]
        if candidate_table is not None and content_table is not None:
            vectors = self._history_vectors(history_ids, gather_rows(candidate_table, history_ids))[1]
        return StepOutput(
            user=torch.cat([states[:, :-1][inner], states[:, -1]]),
            positive=torch.cat([vectors[:, 1:][inner], positive]),
            positive_ids=torch.cat([history_ids[:, 1:][inner], target_ids]),
            unique_ids=unique_ids, unique_content=content_vectors,
        )

    def _encode_distinct(self, target_ids, content, history_ids, encode_mask, history_item_content):
        """The step's distinct encoded items (the targets of `encode_mask`'s rows, and every history item when
        `history_item_content` is given), each run through the encoder once -> (ids [U] sorted, content [U, D])."""
        rows = torch.arange(target_ids.shape[0], device=target_ids.device)
        if encode_mask is not None:
            rows = rows[encode_mask]
        ids = target_ids[rows]
        fields = {k: v[rows] for k, v in content.items()}
        if history_item_content is not None:
            flat_ids = history_ids.reshape(-1)
            real = flat_ids > 0
            ids = torch.cat([ids, flat_ids[real]])
            for key in fields:
                flat = history_item_content[key].reshape(-1, *history_item_content[key].shape[2:])
                fields[key] = torch.cat([fields[key], flat[real]])
        unique_ids, first_row, _ = unique_first(ids)
        return unique_ids, self.item_encoder.encode_fields({k: v[first_row] for k, v in fields.items()})


def gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table [N, D], index [...] (ids may repeat) -> table's rows [..., D]. `index_select`, not `table[index]`: on CPU
    (torch 2.13, 2 threads) the indexing's backward adds repeated rows' gradients in an order that changes from call
    to call, so two runs of one seed drifted apart in the fifth digit of the loss; index_select's backward is
    deterministic and 12-19x faster there (BENCHMARKS.md, session 34)."""
    return table.index_select(0, index.reshape(-1)).view(*index.shape, table.shape[-1])


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
    return torch.where(hit[..., None], gather_rows(fresh_content, pos), history_content)

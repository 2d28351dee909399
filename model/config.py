"""Configuration of the recommender: item space, sequence model and loss."""
from __future__ import annotations

from dataclasses import dataclass

from matryoshka.layers import validate_sizes

MODALITIES = ("image", "text")
SEQUENCE_MODELS = ("sasrec", "lru")
LOSSES = ("sampled_softmax", "full_softmax")
TASKS = ("retrieval", "ctr")


@dataclass(kw_only=True)
class ModelConfig:
    dim: int = 64
    modalities: tuple[str, ...] = ("image", "text")  # () with use_id_embedding=True is the ID-only baseline
    use_id_embedding: bool = False
    # Initial std of the item-id table. 0 = zeros: an item never trained (a cold or new item) keeps a zero id
    # vector and is ranked by its content alone, instead of by a random vector. Needs content (model.modalities).
    id_init_std: float = 0.02
    # DropoutNet-style id dropout: in training, each item occurrence (target, negative, history item) loses its
    # id vector with this probability, so the model also learns to score items from content alone -- which is
    # all a cold or new item has. Not rescaled (an item has its whole id vector or none). Needs content.
    id_dropout: float = 0.0
    sequence_model: str = "sasrec"
    num_layers: int = 2
    num_heads: int = 2
    # Feed-forward hidden width = ffn_multiplier * dim, in every SASRec or LRU block. 4 is the transformer
    # convention; fMRLRec's LRU uses 1 (square layers), which halves a dim-512 LRU training step here (1.14 -> 0.60 s).
    ffn_multiplier: int = 4
    dropout: float = 0.2
    loss: str = "sampled_softmax"
    temperature: float = 0.05  # scores are cosine similarities divided by this
    extra_negatives: int = 0  # uniformly sampled negatives per batch, on top of the in-batch ones
    logq_correction: bool = True  # subtract log sampling probability from in-batch negatives
    # fMRLRec: nested sizes at which item and user vectors are trained and served (() = off). When set, the
    # last size must be `dim`; vectors at size s are the first s dims of the full ones, renormalised.
    matryoshka_sizes: tuple[int, ...] = ()
    task: str = "retrieval"  # retrieval: next-item softmax; ctr: LEMUR's click BCE + grouped contrastive
    ctr_contrastive_weight: float = 1.0
    matryoshka_weights: tuple[float, ...] = ()  # one loss weight per size; () = all 1.0
    # Start the user head's blocks beyond the first size at zero: every user vector starts as the smallest size's,
    # zero-padded, and the wider blocks learn what to add to it (item vectors keep their usual init).
    matryoshka_zero_outer_head: bool = False
    # LRU only (SASRec is always full width). True (fMRLRec): the LRU's layers are block-lower-triangular over
    # the sizes, so a size-s user vector is computed by an s-wide model alone. False (Kusupati et al.'s MRL): a
    # full-width LRU; only the loss and the item projection / user head nest, so a size-s user vector costs the
    # full sequence model, and what shrinks with s is the vectors stored and searched.
    matryoshka_nested_backbone: bool = True
    # Normalise item and user vectors per nested block, each block holding a norm share proportional to its
    # width (`matryoshka.layers.block_normalize`), instead of one L2 norm over the whole vector.
    matryoshka_block_norm: bool = False
    # False: no user head; the user vector is the sequence model's last state, truncated to each size (Kusupati
    # et al.'s MRL, where the final representation itself is nested). Needs a full-width backbone
    # (matryoshka_nested_backbone=false with the LRU, or SASRec): a nested LRU's state prefix needs the head.
    matryoshka_user_head: bool = True

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"model.task={self.task!r}; valid: {', '.join(TASKS)}")
        if self.ctr_contrastive_weight < 0:
            raise ValueError("model.ctr_contrastive_weight must be >= 0")
        bad = [m for m in self.modalities if m not in MODALITIES]
        if bad:
            raise ValueError(f"model.modalities has {bad}; valid: {', '.join(MODALITIES)}")
        if not self.modalities and not self.use_id_embedding:
            raise ValueError("model needs at least one of model.modalities or model.use_id_embedding=true")
        if self.id_init_std < 0:
            raise ValueError(f"model.id_init_std must be >= 0, got {self.id_init_std}")
        if self.id_init_std == 0 and not self.modalities:
            raise ValueError("model.id_init_std=0 needs content (model.modalities): all-zero id vectors alone "
                             "give every item the same score")
        if not 0 <= self.id_dropout < 1:
            raise ValueError(f"model.id_dropout must be in [0, 1), got {self.id_dropout}")
        if self.id_dropout > 0 and not (self.modalities and self.use_id_embedding):
            raise ValueError("model.id_dropout needs both content (model.modalities) and model.use_id_embedding=true: "
                             "it trains the content path to stand in for a missing id vector")
        if self.sequence_model not in SEQUENCE_MODELS:
            raise ValueError(f"model.sequence_model={self.sequence_model!r}; valid: {', '.join(SEQUENCE_MODELS)}")
        if self.loss not in LOSSES:
            raise ValueError(f"model.loss={self.loss!r}; valid: {', '.join(LOSSES)}")
        if self.dim < 1 or self.num_layers < 1 or self.num_heads < 1 or self.ffn_multiplier < 1:
            raise ValueError("model.dim, model.num_layers, model.num_heads and model.ffn_multiplier must be >= 1")
        if self.dim % self.num_heads:
            raise ValueError(f"model.dim={self.dim} must be divisible by model.num_heads={self.num_heads}")
        if not 0 <= self.dropout < 1:
            raise ValueError("model.dropout must be in [0, 1)")
        if self.temperature <= 0:
            raise ValueError("model.temperature must be > 0")
        if self.extra_negatives < 0:
            raise ValueError("model.extra_negatives must be >= 0")
        self._check_matryoshka()

    def _check_matryoshka(self) -> None:
        sizes, weights = self.matryoshka_sizes, self.matryoshka_weights
        if not sizes:
            changed = [name for name, is_set in (("matryoshka_weights", bool(weights)),
                                                 ("matryoshka_zero_outer_head", self.matryoshka_zero_outer_head),
                                                 ("matryoshka_nested_backbone", not self.matryoshka_nested_backbone),
                                                 ("matryoshka_block_norm", self.matryoshka_block_norm),
                                                 ("matryoshka_user_head", not self.matryoshka_user_head))
                       if is_set]
            if changed:
                raise ValueError(f"model.{' / model.'.join(changed)} is set but model.matryoshka_sizes is empty")
            return
        try:
            validate_sizes(sizes, self.dim, require_full=True)
        except ValueError as err:
            # Overrides apply one at a time: when changing both, set model.dim first.
            raise ValueError(f"model.matryoshka_sizes={list(sizes)} does not fit model.dim={self.dim}: {err} "
                             "(sizes must increase and end at model.dim)") from None
        if weights and len(weights) != len(sizes):
            raise ValueError(f"model.matryoshka_weights has {len(weights)} entries for {len(sizes)} "
                             f"model.matryoshka_sizes={list(sizes)}")
        if any(w < 0 for w in weights) or (weights and sum(weights) <= 0):
            raise ValueError(f"model.matryoshka_weights={list(weights)} must be >= 0 and not all zero")
        if not self.matryoshka_user_head and self.sequence_model == "lru" and self.matryoshka_nested_backbone:
            raise ValueError("model.matryoshka_user_head=false needs a full-width backbone: set "
                             "model.matryoshka_nested_backbone=false (a nested LRU's state prefixes need the head)")
        if not self.matryoshka_user_head and self.matryoshka_zero_outer_head:
            raise ValueError("model.matryoshka_zero_outer_head initialises the user head, but "
                             "model.matryoshka_user_head=false has none")

    @property
    def supported_sizes(self) -> tuple[int, ...]:
        """The vector sizes this model serves: the Matryoshka sizes, or just `dim`."""
        return tuple(self.matryoshka_sizes) or (self.dim,)

    @property
    def loss_weights(self) -> tuple[float, ...]:
        """One weight per supported size (1.0 each unless configured)."""
        return tuple(self.matryoshka_weights) or tuple(1.0 for _ in self.supported_sizes)

"""Configuration of the recommender: item space, sequence model and loss."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from matryoshka.layers import validate_sizes

MODALITIES = ("image", "text")
SEQUENCE_MODELS = ("sasrec", "lru")
LOSSES = ("auto", "sampled_softmax", "full_softmax")
TASKS = ("retrieval", "ctr")
PRECISIONS = ("fp32", "bf16")


NEW_ITEM_OFFSET_RANGE = (-2.0, 2.0)


def valid_new_item_offset(value: float) -> bool:
    """`model.new_item_offset` (and the serving override) lies in [-2, 2]: cosines are in [-1, 1], so beyond 2 the
    new items' order against the others is fixed anyway (NaN is not valid)."""
    low, high = NEW_ITEM_OFFSET_RANGE
    return low <= value <= high


@dataclass(kw_only=True)
class ModelConfig:
    dim: int = field(default=64, metadata={"help": "width of item and user vectors and of the sequence model"})
    modalities: tuple[str, ...] = field(
        default=("image", "text"),
        metadata={"help": "content item vectors are built from: image,text (empty + use_id_embedding = ID-only)"})
    use_id_embedding: bool = field(
        default=False, metadata={"help": "add a learned per-item id vector to each item's content vector"})
    sequence_model: str = field(
        default="sasrec", metadata={"help": "sasrec (causal transformer) or lru (linear recurrent unit)"})
    num_layers: int = field(default=2, metadata={"help": "sequence-model blocks"})
    num_heads: int = field(default=2, metadata={"help": "SASRec attention heads (model.dim must be divisible by it)"})
    dropout: float = field(default=0.2, metadata={"help": "dropout in the item fusion and the sequence model"})
    loss: str = field(
        default="auto",
        metadata={"help": "full_softmax (every item; content from the bank unless exact), sampled_softmax "
                          "(in-batch negatives, logQ-corrected) or auto (full where every item's vector is exact "
                          "each step, up to 100,000 items; else sampled)"})
    temperature: float = field(default=0.05, metadata={"help": "scores are cosine similarities divided by this"})
    # Matryoshka: nested sizes at which item and user vectors are trained and served (() = off). When set, the
    # last size must be `dim`; vectors at size s are the first s dims of the full ones, renormalised.
    matryoshka_sizes: tuple[int, ...] = field(
        default=(),
        metadata={"help": "nested vector sizes trained and served by one model, the last = model.dim (empty = off)"})
    task: str = field(
        default="retrieval",
        metadata={"help": "retrieval (next-item softmax) or ctr (LEMUR's click BCE + grouped contrastive)"})
    matryoshka_weights: tuple[float, ...] = field(
        default=(), metadata={"help": "loss weight per Matryoshka size (empty = all 1)"})
    side_network: int = field(
        default=0,
        metadata={"help": "width of a network trained beside each frozen encoder on every layer's pooled output "
                          "(IISAN-style; needs image/text.unfreeze_top=0; 0 = none)"})
    id_dropout: float = field(
        default=0.0,
        metadata={"help": "in training, the share of item occurrences (history, positive, candidate) whose id "
                          "vector is dropped, so the content alone must score them (DropoutNet-style; 0 = off)"})
    encoder_precision: str = field(
        default="fp32",
        metadata={"help": "fp32, or bf16: the image and text backbones run under bfloat16 autocast (their "
                          "outputs, side networks, fusion, sequence model and loss stay fp32), in training, "
                          "evaluation and serving alike; fast where the device has bf16 units (GPUs, CPUs with "
                          "AVX512-BF16 or AMX), slower than fp32 elsewhere"})
    unseen_from_content: bool = field(
        default=True,
        metadata={"help": "items in no training example are left out of the full softmax (not trained as "
                          "negatives) and scored by their content alone (a zero id vector)"})
    new_item_offset: float = field(
        default=0.0,
        metadata={"help": "added to the cosine score of every item in no training example (held out, new since "
                          "training, added at serving) wherever items are ranked: validation (so it moves the "
                          "checkpoint kept), test, jobs.evaluate, the retrain gate, export's table and serving; "
                          "not in training. Sets new items' exposure against warm accuracy (one trade: "
                          "BENCHMARKS.md); bench.new_item_boost --match-cold prints the offset that reaches a cold "
                          "Recall@10 (in [-2, 2]; 0 = off)"})

    # Fixed (not settings). The logQ correction (subtract log sampling probability from in-batch negatives) is
    # always on: without it the model learns to rank popular items down, which full ranking on MovieLens punishes
    # (test NDCG@10 0.0213 without it vs 0.0232 for most-popular; BENCHMARKS.md). No uniformly sampled negatives
    # beyond the in-batch ones; LEMUR's CTR loss weighs its contrastive term 1.
    logq_correction: ClassVar[bool] = True
    extra_negatives: ClassVar[int] = 0
    ctr_contrastive_weight: ClassVar[float] = 1.0
    # loss=auto picks the full softmax only where a step can compute every item's vector exactly (ID-only
    # models; frozen encoders with the trunk cache) and the catalogue has at most this many items. With trained
    # encoders the other items' content could only come from the bank, stale by up to an epoch: on one repeated
    # batch the full softmax over such vectors stops fitting (loss 8.36 -> 1.63 after 3 steps, then up to 3.25
    # by step 30) while the in-batch sampled softmax, whose vectors are all fresh, fits (5.68 -> 0.74).
    full_softmax_max_items: ClassVar[int] = 100_000

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"model.task={self.task!r}; valid: {', '.join(TASKS)}")
        bad = [m for m in self.modalities if m not in MODALITIES]
        if bad:
            raise ValueError(f"model.modalities has {bad}; valid: {', '.join(MODALITIES)}")
        if not self.modalities and not self.use_id_embedding:
            raise ValueError("model needs at least one of model.modalities or model.use_id_embedding=true")
        if self.sequence_model not in SEQUENCE_MODELS:
            raise ValueError(f"model.sequence_model={self.sequence_model!r}; valid: {', '.join(SEQUENCE_MODELS)}")
        if self.loss not in LOSSES:
            raise ValueError(f"model.loss={self.loss!r}; valid: {', '.join(LOSSES)}")
        if self.dim < 1 or self.num_layers < 1 or self.num_heads < 1:
            raise ValueError("model.dim, model.num_layers and model.num_heads must be >= 1")
        if self.dim % self.num_heads:
            raise ValueError(f"model.dim={self.dim} must be divisible by model.num_heads={self.num_heads}")
        if self.side_network < 0:
            raise ValueError(f"model.side_network={self.side_network} must be >= 0 (0 = none)")
        if not 0 <= self.dropout < 1:
            raise ValueError("model.dropout must be in [0, 1)")
        if not 0 <= self.id_dropout < 1:
            raise ValueError("model.id_dropout must be in [0, 1)")
        if self.encoder_precision not in PRECISIONS:
            raise ValueError(f"model.encoder_precision={self.encoder_precision!r}; valid: {', '.join(PRECISIONS)}")
        if self.temperature <= 0:
            raise ValueError("model.temperature must be > 0")
        if not valid_new_item_offset(self.new_item_offset):
            raise ValueError(f"model.new_item_offset={self.new_item_offset} must be in [-2, 2] (a cosine offset)")
        self._check_matryoshka()

    def _check_matryoshka(self) -> None:
        sizes, weights = self.matryoshka_sizes, self.matryoshka_weights
        if not sizes:
            if weights:
                raise ValueError("model.matryoshka_weights is set but model.matryoshka_sizes is empty")
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

    def resolved_loss(self, num_items: int, exact_catalogue: bool) -> str:
        """The loss a run trains with (`auto` resolved): `num_items` catalogue items; `exact_catalogue`, whether
        a step can compute every item's vector exactly (see `training.trainer.exact_catalogue`)."""
        if self.loss != "auto":
            return self.loss
        fits = num_items <= self.full_softmax_max_items
        return "full_softmax" if fits and exact_catalogue else "sampled_softmax"

    @property
    def supported_sizes(self) -> tuple[int, ...]:
        """The vector sizes this model serves: the Matryoshka sizes, or just `dim`."""
        return tuple(self.matryoshka_sizes) or (self.dim,)

    @property
    def loss_weights(self) -> tuple[float, ...]:
        """One weight per supported size (1.0 each unless configured)."""
        return tuple(self.matryoshka_weights) or tuple(1.0 for _ in self.supported_sizes)

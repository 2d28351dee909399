"""Configuration of the recommender: item space, sequence model and loss."""
from __future__ import annotations

from dataclasses import dataclass

MODALITIES = ("image", "text")
SEQUENCE_MODELS = ("sasrec", "lru")
LOSSES = ("sampled_softmax", "full_softmax")


@dataclass(kw_only=True)
class ModelConfig:
    dim: int = 64
    modalities: tuple[str, ...] = ("image", "text")  # () with use_id_embedding=True is the ID-only baseline
    use_id_embedding: bool = False
    sequence_model: str = "sasrec"
    num_layers: int = 2
    num_heads: int = 2
    dropout: float = 0.2
    loss: str = "sampled_softmax"
    temperature: float = 0.05  # scores are cosine similarities divided by this
    extra_negatives: int = 0  # uniformly sampled negatives per batch, on top of the in-batch ones
    logq_correction: bool = True  # subtract log sampling probability from in-batch negatives

    def __post_init__(self) -> None:
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
        if not 0 <= self.dropout < 1:
            raise ValueError("model.dropout must be in [0, 1)")
        if self.temperature <= 0:
            raise ValueError("model.temperature must be > 0")
        if self.extra_negatives < 0:
            raise ValueError("model.extra_negatives must be >= 0")

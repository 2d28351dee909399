"""Fusion of image and text features into one item embedding (and an optional item-id embedding).

Following fMRLRec, each modality's features are L2-normalised, concatenated and mapped into one space by a
linear layer. A missing modality is replaced by a learned placeholder vector (per modality), never by dropping
the item. The content part (what the memory bank caches) and the id part (cheap, always fresh) are separate.

With `matryoshka_sizes` the projection is fMRLRec's block-lower-triangular `MatryoshkaLinear`, so the first s
dims of a content vector are exactly what a size-s projection would produce; the id table needs no change (its
first s columns are a size-s table).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from encoders.dropout import Dropout, drop_threshold, keep_mask
from encoders.side import SideNetwork
from matryoshka.layers import MatryoshkaLinear


def slow_bf16(device: torch.device) -> str:
    """Why bfloat16 autocast would run slower than fp32 on `device` ("" when it has bf16 units, or cannot tell)."""
    try:
        if device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return "this CPU has no bf16 units (AVX512-BF16 or AMX)"
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return "this GPU does not support bf16"
    except (AttributeError, RuntimeError):  # a torch build without the probe
        return ""
    return ""


class ItemEncoder(nn.Module):
    def __init__(
        self,
        *,
        image_encoder: nn.Module | None,
        text_encoder: nn.Module | None,
        dim: int,
        num_items: int,
        use_id_embedding: bool,
        projection: nn.Module | None = None,
        dropout: float = 0.1,
        matryoshka_sizes: tuple[int, ...] = (),
        side_width: int = 0,
        id_dropout: float = 0.0,
        bf16_backbones: bool = False,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.dim = dim
        feature_dim = (image_encoder.out_dim if image_encoder is not None else 0) + (
            text_encoder.out_dim if text_encoder is not None else 0
        )
        self.has_content = feature_dim > 0
        if self.has_content:
            if image_encoder is not None:
                self.missing_image = nn.Parameter(torch.zeros(image_encoder.out_dim))
            if text_encoder is not None:
                self.missing_text = nn.Parameter(torch.zeros(text_encoder.out_dim))
            if projection is None:
                # The concatenated features are a plain vector (in_sizes=None): every output block reads all of it.
                projection = (MatryoshkaLinear(feature_dim, dim, matryoshka_sizes) if matryoshka_sizes
                              else nn.Linear(feature_dim, dim))
            self.projection = projection
            self.dropout = Dropout(dropout)
        # `model.side_network`: a network trained beside each frozen encoder, reading every layer's pooled output
        # (then each encoder's trunk field holds those outputs, and its top is the side network's correction)
        self.image_side = self._side_network("image", image_encoder, side_width)
        self.text_side = self._side_network("text", text_encoder, side_width)
        self.id_embedding = nn.Embedding(num_items + 1, dim, padding_idx=0) if use_id_embedding else None
        # model.encoder_precision=bf16: the backbones (frozen trunks and trained tops) run under bfloat16 autocast
        # and hand fp32 on; side networks, fusion and id vectors are fp32 either way
        self.bf16_backbones = bf16_backbones
        drop_threshold(id_dropout)
        self.id_dropout = id_dropout  # training only: P(an occurrence of an item gets no id vector)
        if self.id_embedding is not None:
            nn.init.normal_(self.id_embedding.weight, std=0.02)
            with torch.no_grad():
                self.id_embedding.weight[0].zero_()

    @staticmethod
    def _side_network(name: str, encoder: nn.Module | None, width: int) -> SideNetwork | None:
        if encoder is None or width == 0:
            return None
        if encoder.unfreeze_top != 0:
            raise ValueError(f"model.side_network trains beside a frozen encoder; {name}.unfreeze_top="
                             f"{encoder.unfreeze_top} (set it to 0)")
        return SideNetwork(encoder.layer_widths(), width)

    def _backbone_precision(self, like: torch.Tensor) -> torch.autocast:
        """bfloat16 autocast on `like`'s device where model.encoder_precision=bf16 (else a context that does
        nothing)."""
        return torch.autocast(like.device.type, dtype=torch.bfloat16, enabled=self.bf16_backbones)

    def _trunk(self, encoder: nn.Module, side: SideNetwork | None, *inputs: torch.Tensor) -> torch.Tensor:
        """One encoder's trunk field: its frozen part's output, or every layer's pooled output with a side network
        (fp32; the token ids themselves where nothing of the encoder is frozen)."""
        with self._backbone_precision(inputs[0]):
            trunk = torch.cat(encoder.layer_features(*inputs), dim=-1) if side is not None else encoder.trunk(*inputs)
        return trunk.float() if trunk.is_floating_point() else trunk

    def _top(self, encoder: nn.Module, side: SideNetwork | None, trunk: torch.Tensor,
             *inputs: torch.Tensor) -> torch.Tensor:
        """One encoder's trunk field -> its features: the trained top, or the frozen output plus the side network's
        correction."""
        if side is None:
            with self._backbone_precision(trunk):
                return encoder.top(trunk, *inputs).float()
        return trunk[..., -encoder.out_dim:] + side(trunk)

    @staticmethod
    def _with_placeholder(features: torch.Tensor, mask: torch.Tensor, placeholder: torch.Tensor) -> torch.Tensor:
        features = F.normalize(features, dim=-1)
        return torch.where(mask[:, None], features, placeholder.expand_as(features))

    def content_trunk(self, image: torch.Tensor, image_mask: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor, text_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Decoded content of B items -> their trunk fields (no gradient): each encoder's frozen-part output
        (`image_trunk`, `text_trunk`) and the per-item inputs the trained top still needs (masks, tokens). A pure
        function of the items' content: `training.trunk_cache` keeps it per item."""
        fields: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            if self.image_encoder is not None:
                fields.update(image_trunk=self._trunk(self.image_encoder, self.image_side, image),
                              image_mask=image_mask)
            if self.text_encoder is not None:
                fields.update(text_trunk=self._trunk(self.text_encoder, self.text_side, input_ids, attention_mask),
                              input_ids=input_ids, attention_mask=attention_mask, text_mask=text_mask)
        return fields

    def encode_trunk(self, fields: dict[str, torch.Tensor], size: int | None = None, *,
                     dropout: bool = True) -> torch.Tensor:
        """Trunk fields of B items (`content_trunk`, or rows of the trunk cache) -> content vectors [B, D]
        (zeros if no content). `size` (a Matryoshka size) runs only the size-s sub-projection -> [B, size], equal
        to the first `size` dims of the full vectors."""
        if not self.has_content:
            first = next(iter(fields.values()))
            return torch.zeros(first.shape[0], size or self.dim, device=first.device)
        features = self._fused_features(fields)
        return self._project(self.dropout(features) if dropout else features, size)

    def encode_trunk_twice(self, fields: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Trunk fields of B items -> (content through the fusion's dropout, content without it), [B, D] each; the
        encoders' tops run once (`Trainer.catalogue_table`: history items read the first, the loss's candidates
        the second). Without content, or with dropout off, both are one tensor."""
        if not self.has_content:
            zeros = self.encode_trunk(fields)
            return zeros, zeros
        features = self._fused_features(fields)
        clean = self._project(features, None)
        if not self.training or self.dropout.p == 0:
            return clean, clean
        return self._project(self.dropout(features), None), clean

    def _fused_features(self, fields: dict[str, torch.Tensor]) -> torch.Tensor:
        """Trunk fields -> each modality's top output, normalised (placeholders where missing), concatenated."""
        parts = []
        if self.image_encoder is not None:
            features = self._top(self.image_encoder, self.image_side, fields["image_trunk"])
            parts.append(self._with_placeholder(features, fields["image_mask"].bool(), self.missing_image))
        if self.text_encoder is not None:
            features = self._top(self.text_encoder, self.text_side, fields["text_trunk"], fields["input_ids"],
                                 fields["attention_mask"])
            parts.append(self._with_placeholder(features, fields["text_mask"].bool(), self.missing_text))
        return torch.cat(parts, dim=-1)

    def _project(self, features: torch.Tensor, size: int | None) -> torch.Tensor:
        if size is None or size == self.dim:
            return self.projection(features)
        if not isinstance(self.projection, MatryoshkaLinear):
            raise ValueError(f"content vectors of size {size} need a Matryoshka projection; this one is {self.dim}-only")
        return self.projection.forward_prefix(features, size)

    def encode_content(
        self,
        image: torch.Tensor,
        image_mask: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        text_mask: torch.Tensor,
        size: int | None = None,
    ) -> torch.Tensor:
        """image [B,3,S,S] uint8, masks [B] bool, tokens [B,T] -> content vectors [B, D]: the trunk, then the
        trained top (`encode_trunk`)."""
        if not self.has_content:
            return torch.zeros(image.shape[0], size or self.dim, device=image.device)
        return self.encode_trunk(self.content_trunk(image, image_mask, input_ids, attention_mask, text_mask), size)

    def encode_fields(self, fields: dict[str, torch.Tensor], size: int | None = None) -> torch.Tensor:
        """Either kind of per-item fields -> content vectors: trunk fields (keys `image_trunk` / `text_trunk`)
        go straight to the top, decoded content (`image`, `input_ids`, ...) through the trunk first."""
        if "image_trunk" in fields or "text_trunk" in fields or not self.has_content:
            return self.encode_trunk(fields, size)
        return self.encode_content(fields["image"], fields["image_mask"], fields["input_ids"],
                                   fields["attention_mask"], fields["text_mask"], size)

    def trunk_cache_unsupported(self) -> str:
        """Why the trunk fields cannot be cached per item ("" when they can)."""
        if not self.has_content:
            return "the model has no content encoders"
        reasons = [f"{name}: {encoder.trunk_cache_unsupported()}"
                   for name, encoder in (("image", self.image_encoder), ("text", self.text_encoder))
                   if encoder is not None and encoder.trunk_cache_unsupported()]
        return "; ".join(reasons)

    def id_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """[...] item ids -> [..., D] id embeddings (zeros when ids are not used)."""
        if self.id_embedding is None:
            return torch.zeros(*ids.shape, self.dim, device=ids.device)
        vectors = self.id_embedding(ids)
        if self.training and self.id_dropout > 0:
            # DropoutNet-style: a whole id vector is dropped (not rescaled), so the content alone must score it
            vectors = vectors * keep_mask(ids.shape, self.id_dropout, ids.device).unsqueeze(-1).to(vectors.dtype)
        return vectors

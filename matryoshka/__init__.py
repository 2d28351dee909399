"""Matryoshka (nested-dimension) primitives: the lowest layer, imported by both encoders/ and model/ (torch only)."""

"""Moved: ``multi_head_attention`` lives in :mod:`abfp.ops.attention` (the attention family)."""

from ..ops.attention import multi_head_attention

__all__ = ["multi_head_attention"]

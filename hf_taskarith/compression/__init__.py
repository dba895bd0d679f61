"""Compact encodings of task vectors for sharing: top-k, sign+scale, low-rank."""

from .codecs import CODECS, Codec, get_codec, register_codec
from .compressed import DecodedTensors, compress

__all__ = ["compress", "DecodedTensors", "Codec", "CODECS", "get_codec", "register_codec"]

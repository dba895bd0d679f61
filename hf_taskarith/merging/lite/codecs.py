"""float32 <-> stored dtypes with numpy, bit-exact with torch's conversions.

numpy has no bfloat16, so bfloat16 is handled as its bit pattern: widening shifts the 16
bits into the top of a float32 (exact), narrowing rounds to nearest, ties to even, as
``torch.Tensor.to(torch.bfloat16)`` does for finite values (the merge checks finiteness
before converting). float16 and float32 use numpy's own IEEE conversions, which round the
same way torch's do.
"""

from __future__ import annotations

import numpy as np

#: the float dtype codes this path reads and writes
CODES = ("F32", "F16", "BF16")
#: numpy dtype of each code's stored elements
STORED = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(np.uint16)}


def decode(code: str, raw: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Widen stored elements ``raw`` (of dtype ``STORED[code]``) into the float32 ``out``."""
    if code == "BF16":
        bits = out.view(np.uint32)
        np.copyto(bits, raw)           # zero-extend the 16 bits ...
        np.left_shift(bits, 16, out=bits)  # ... into the top half: the exact float32 value
    else:
        np.copyto(out, raw)
    return out


def encode(code: str, values: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """Narrow float32 ``values`` into ``out`` (dtype ``STORED[code]``); ``scratch`` is a
    uint32 buffer of the same length (used for bfloat16 rounding)."""
    if code == "BF16":
        bits = values.view(np.uint32)
        np.right_shift(bits, 16, out=scratch)
        np.bitwise_and(scratch, 1, out=scratch)      # lowest kept bit: ties go to even
        np.add(scratch, 0x7FFF, out=scratch)
        np.add(scratch, bits, out=scratch)            # round half to even at bit 16
        np.right_shift(scratch, 16, out=scratch)
        np.copyto(out, scratch, casting="unsafe")
    else:
        np.copyto(out, values, casting="same_kind")
    return out

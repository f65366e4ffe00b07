"""dtype names as configs spell them, to numpy's."""

from __future__ import annotations

import ml_dtypes
import numpy as np


def np_dtype(name: str):
    """numpy dtype for a config dtype name (bfloat16 through ml_dtypes)."""
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)

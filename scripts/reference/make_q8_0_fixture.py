#!/usr/bin/env python3
"""Write the Q8_0 reference fixture: a small f32 matrix and the Q8_0 blocks that the `gguf`
Python package (ggml's own Python reader/writer) makes of it.

    pip install gguf numpy
    python3 scripts/reference/make_q8_0_fixture.py tests/fixtures/q8_0

values.f32 holds 6 x 64 little-endian f32 values (row-major); q8_0.bin holds the 12 blocks of
34 bytes each (f16 scale, then 32 int8 values) in ggml's layout.
"""
import os
import sys

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import quantize

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
rng = np.random.default_rng(3)
rows, cols = 6, 64
x = rng.normal(0.0, 1.0, (rows, cols)).astype(np.float32)
x[1, :32] = 0.0                                   # an all-zero block: scale 0
x[2, :32] = np.arange(32, dtype=np.float32) - 15.5  # halves: rounding ties
x[2, 32:] = 127.0 * np.sign(rng.normal(size=32)).astype(np.float32)  # exact extremes
x[3] *= 1e-3                                      # small values
x[4] *= 300.0                                     # large values
x[5, 7] = 50.0                                    # one outlier per block
x[5, 40] = -50.0
q = quantize(x, GGMLQuantizationType.Q8_0)
assert q.dtype == np.uint8 and q.shape == (rows, cols // 32 * 34), q.shape
x.astype("<f4").tofile(os.path.join(out, "values.f32"))
q.tofile(os.path.join(out, "q8_0.bin"))
print(f"wrote {rows}x{cols} values and {q.size} bytes of Q8_0 blocks to {out}")

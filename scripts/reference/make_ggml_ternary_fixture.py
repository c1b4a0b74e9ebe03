#!/usr/bin/env python3
"""Write the TQ1_0 / TQ2_0 reference fixture: a small f32 matrix, the ggml blocks that the
`gguf` Python package makes of it, and what that package decodes them to.

    pip install gguf numpy
    python3 scripts/reference/make_ggml_ternary_fixture.py tests/fixtures/ggml-ternary

values.f32 holds 4 x 512 little-endian f32 values, row-major (two 256-value blocks per row):
rows 0 and 1 are ternary times one scale per row (what a BitNet matrix is), row 2 has a
different scale in each block, row 3 is not ternary (the quantizer rounds). tq1_0.bin and
tq2_0.bin hold the blocks (54 and 66 bytes each); *.dequant.f32 the values decoded from them.
"""
import os
import sys

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
rng = np.random.default_rng(11)
rows, cols = 4, 512
t = rng.integers(-1, 2, size=(rows, cols)).astype(np.float32)
x = t.copy()
x[0] *= 0.75
x[1] *= 1.25
x[2, :256] *= 0.5
x[2, 256:] *= 2.0
x[3] = rng.normal(0.0, 1.0, cols).astype(np.float32)
x[3, :8] = [0.5, -0.5, 0.49, -0.51, 0.0, 1e-3, -2.0, 2.0]  # rounding near the thresholds
x.astype("<f4").tofile(os.path.join(out, "values.f32"))
for name, qt in [("tq1_0", T.TQ1_0), ("tq2_0", T.TQ2_0)]:
    q = quantize(x, qt)
    q.tofile(os.path.join(out, f"{name}.bin"))
    dequantize(q, qt).astype("<f4").tofile(os.path.join(out, f"{name}.dequant.f32"))
    print(f"{name}: {q.size} bytes")

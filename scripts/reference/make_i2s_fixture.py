#!/usr/bin/env python3
"""Write the I2_S reference fixture: a small ternary matrix times one scale and the bytes that
bitnet.cpp's reference quantizer (`quantize_i2_s` in its ggml-bitnet-mad.cpp, the one that made
the published 2B-4T GGUF) makes of it. The quantizer is transcribed here step by step; the
`gguf` package does not know I2_S.

    pip install numpy
    python3 scripts/reference/make_i2s_fixture.py tests/fixtures/ggml-ternary

i2_s.values.f32 holds 3 x 256 little-endian f32 values (row-major); i2_s.bin the tensor's
bytes: n/4 bytes of 2-bit codes, then the f32 scale, then zero padding to 32 bytes.
"""
import os
import sys

import numpy as np

QK_I2 = 128

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
rng = np.random.default_rng(23)
rows, cols = 3, 256
t = rng.integers(-1, 2, size=(rows, cols)).astype(np.float32)
src = (t * np.float32(0.6875)).reshape(-1)
n = src.size

# f32 -> q8: the largest |w| is the scale; |w| < 1e-6 is 0 (code 1), else the sign (0 or 2).
i2_scale = float(np.max(np.abs(src.astype(np.float64))))
q8 = np.where(np.abs(src.astype(np.float64)) < 1e-6, 1,
              np.where(src.astype(np.float64) * i2_scale > 0, 2, 0)).astype(np.uint8)

# Groups of 128: weight j of group i goes to byte i*32 + j%32, shifted by 6 - 2*(j//32).
dst = np.zeros(n // 4 + 32, dtype=np.uint8)
for i in range(n // QK_I2):
    for j in range(QK_I2):
        group_idx, group_pos = j // 32, j % 32
        dst[i * 32 + group_pos] |= np.uint8(q8[i * QK_I2 + j] << (6 - 2 * group_idx))
dst[n // 4:n // 4 + 4] = np.frombuffer(np.float32(i2_scale).tobytes(), dtype=np.uint8)

src.astype("<f4").tofile(os.path.join(out, "i2_s.values.f32"))
dst.tofile(os.path.join(out, "i2_s.bin"))
print(f"wrote {n} values and {dst.size} bytes of I2_S to {out}")

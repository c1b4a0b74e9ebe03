#!/usr/bin/env python3
"""Write the GGUF container fixture with the `gguf` Python package (llama.cpp's own writer):
metadata of every value type and tensors of the types bitsvf reads, plus the f32 values each
tensor decodes to, so the reader is checked against an outside implementation.

    pip install gguf numpy
    python3 scripts/reference/make_gguf_fixture.py tests/fixtures/gguf

small.gguf holds: general.architecture "bitnet", u8/i8/u16/i16/u32/i32/f32/bool/string/u64/i64/
f64 scalars under test.*, an array of u32 and an array of strings; tensors `f32` [3, 4],
`f16` [2, 8], `q8_0` [2, 64], `tq2_0` [2, 256], `tq1_0` [1, 256] (numpy shapes: rows, cols).
<name>.f32 holds each tensor's values as little-endian f32, row-major.
"""
import os
import sys

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter
from gguf.quants import dequantize, quantize

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
rng = np.random.default_rng(5)
w = GGUFWriter(os.path.join(out, "small.gguf"), "bitnet")
w.add_uint8("test.u8", 200)
w.add_int8("test.i8", -100)
w.add_uint16("test.u16", 60000)
w.add_int16("test.i16", -30000)
w.add_uint32("test.u32", 4000000000)
w.add_int32("test.i32", -2000000000)
w.add_float32("test.f32", 1.5)
w.add_bool("test.bool", True)
w.add_string("test.string", "ternäry")
w.add_uint64("test.u64", 2**40 + 3)
w.add_int64("test.i64", -(2**40))
w.add_float64("test.f64", -0.25)
w.add_array("test.array_u32", [1, 2, 3])
w.add_array("test.array_str", ["a", "bc", ""])

tensors = {
    "f32": (rng.normal(size=(3, 4)).astype(np.float32), None),
    "f16": (rng.normal(size=(2, 8)).astype(np.float16), None),
    "q8_0": (rng.normal(size=(2, 64)).astype(np.float32), T.Q8_0),
    "tq2_0": ((rng.integers(-1, 2, size=(2, 256)) * 0.5).astype(np.float32), T.TQ2_0),
    "tq1_0": ((rng.integers(-1, 2, size=(1, 256)) * 2.0).astype(np.float32), T.TQ1_0),
}
for name, (x, qt) in tensors.items():
    if qt is None:
        w.add_tensor(name, x)
        values = x.astype(np.float32)
    else:
        q = quantize(x, qt)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qt)
        values = dequantize(q, qt)
    values.astype("<f4").tofile(os.path.join(out, f"{name}.f32"))
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
print("wrote", os.path.join(out, "small.gguf"), os.path.getsize(os.path.join(out, "small.gguf")), "bytes")

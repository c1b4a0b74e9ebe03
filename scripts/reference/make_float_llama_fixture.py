#!/usr/bin/env python3
"""Write the float Llama fixture: a tiny random Llama (GQA, SiLU FFN, untied output) as a
Hugging Face checkpoint and as three GGUF files laid out the way llama.cpp's
convert_hf_to_gguf.py lays out a `llama` model, with the logits transformers computes for the
exact weights each file holds; and, beside it, the ggml float-codec fixture.

    pip install torch transformers safetensors gguf numpy
    python scripts/reference/make_float_llama_fixture.py tests/fixtures/float-llama

OUTDIR/hf holds config.json and model.safetensors (f32, `save_pretrained`; vocab 96, d 64,
FFN 128, 2 layers, 4 query heads and 2 key/value heads of width 16, rope θ 10000).
OUTDIR/llama-f32.gguf stores every matrix as F32, llama-f16.gguf every matrix as F16, and
llama-q8_0.gguf the linears as Q8_0 with token_embd and output as F16; norms are F32 in all
three. As in the converter, the rows of attn_q and attn_k are permuted from the HF rotary
layout (halves) to the interleaved one ggml's RoPE expects; there is no tokenizer, only the
bos/eos ids. OUTDIR/expected.json holds the token ids of two sequences and, for each of
"hf", "f32", "f16" and "q8_0", the logits ([sequence][position][vocab]) of transformers
(eager attention, f32) run on the weights that file decodes to, in the HF layout.

The codec fixture goes to CODECDIR (by default OUTDIR/../ggml-float): for each of Q4_0,
Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K and Q6_K a 3 x 512 matrix, <type>.bin its
blocks and <type>.values.f32 the little-endian f32 values (row-major) the `gguf` package
decodes them to. The package cannot quantize the K types, so their blocks are random bytes
with finite super-scales; manifest.json says which is which.
"""
import json
import os
import shutil
import sys

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGML_QUANT_SIZES, GGUFWriter, LlamaFileType
from gguf.quants import dequantize, quantize
from transformers import LlamaConfig, LlamaForCausalLM

from random_llama import scale_weights

out = sys.argv[1]
codec_out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(os.path.abspath(out)), "ggml-float")
os.makedirs(out, exist_ok=True)
os.makedirs(codec_out, exist_ok=True)

# ---- the model -------------------------------------------------------------------------------

torch.manual_seed(0)
cfg = LlamaConfig(
    vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_act="silu",
    max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
    tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
    bos_token_id=1, eos_token_id=2,
)
model = LlamaForCausalLM(cfg)
model.set_attn_implementation("eager")
model.eval()
scale_weights(model)  # logits of order one, not the default initialisation's near-zero ones

hf_dir = os.path.join(out, "hf")
if os.path.isdir(hf_dir):
    shutil.rmtree(hf_dir)
model.save_pretrained(hf_dir, safe_serialization=True)
for f in os.listdir(hf_dir):
    if f not in ("config.json", "model.safetensors"):
        os.remove(os.path.join(hf_dir, f))
    else:
        os.chmod(os.path.join(hf_dir, f), 0o644)

sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
head_dim = cfg.head_dim


def permute(w, n):
    # convert_hf_to_gguf.py's LlamaModel.permute: HF rotary halves -> ggml interleaved pairs.
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w, n):
    return w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# HF name -> (GGUF name, rows permuted for this many heads or None, is a linear)
names = {
    "model.embed_tokens.weight": ("token_embd.weight", None, False),
    "model.norm.weight": ("output_norm.weight", None, False),
    "lm_head.weight": ("output.weight", None, False),
}
for i in range(cfg.num_hidden_layers):
    p = f"model.layers.{i}."
    names[p + "input_layernorm.weight"] = (f"blk.{i}.attn_norm.weight", None, False)
    names[p + "post_attention_layernorm.weight"] = (f"blk.{i}.ffn_norm.weight", None, False)
    names[p + "self_attn.q_proj.weight"] = (f"blk.{i}.attn_q.weight", n_head, True)
    names[p + "self_attn.k_proj.weight"] = (f"blk.{i}.attn_k.weight", n_kv, True)
    names[p + "self_attn.v_proj.weight"] = (f"blk.{i}.attn_v.weight", None, True)
    names[p + "self_attn.o_proj.weight"] = (f"blk.{i}.attn_output.weight", None, True)
    names[p + "mlp.gate_proj.weight"] = (f"blk.{i}.ffn_gate.weight", None, True)
    names[p + "mlp.up_proj.weight"] = (f"blk.{i}.ffn_up.weight", None, True)
    names[p + "mlp.down_proj.weight"] = (f"blk.{i}.ffn_down.weight", None, True)
assert set(names) == set(sd), sorted(set(names) ^ set(sd))


def stored(w, variant, linear):
    """What a file of this variant stores for w (GGUF layout): (array, raw_dtype or None)."""
    if w.ndim == 1 or variant == "f32":
        return w.astype(np.float32), None
    if variant == "f16" or not linear:
        return w.astype(np.float16), None
    return quantize(w, T.Q8_0), T.Q8_0


def decoded(data, qtype):
    return (dequantize(data, qtype) if qtype is not None else data).astype(np.float32)


file_types = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
              "q8_0": LlamaFileType.MOSTLY_Q8_0}
variant_sd = {}
for variant, ftype in file_types.items():
    w = GGUFWriter(os.path.join(out, f"llama-{variant}.gguf"), "llama")
    w.add_name("float-llama-tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_file_type(ftype)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(head_dim)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    altered = {}
    for hf_name, (gguf_name, heads, linear) in names.items():
        x = sd[hf_name]
        if heads is not None:
            x = permute(x, heads)
        data, qtype = stored(x, variant, linear)
        if qtype is None:
            w.add_tensor(gguf_name, data)
        else:
            w.add_tensor(gguf_name, data, raw_dtype=qtype)
        # Back to the HF layout, for transformers to run on exactly these values.
        back = decoded(data, qtype)
        if heads is not None:
            back = unpermute(back, heads)
        altered[hf_name] = back
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    variant_sd[variant] = altered

# The un-permutation undoes the permutation, and the f32 file holds the model itself.
for hf_name, x in sd.items():
    assert np.array_equal(variant_sd["f32"][hf_name], x), hf_name
    heads = names[hf_name][1]
    if heads is not None:
        assert np.array_equal(unpermute(permute(x, heads), heads), x)

ids = [[1, 5, 17, 33, 60, 2, 9, 71], [1, 88, 3, 3, 40]]


def logits_of(state):
    m = LlamaForCausalLM(cfg)
    m.set_attn_implementation("eager")
    m.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()}, strict=True)
    m.eval()
    with torch.no_grad():
        return [m(torch.tensor([s])).logits[0].float().numpy() for s in ids]


def as_lists(seqs):
    # Shortest decimal that reads back as the same f32.
    return [[[float(str(v)) for v in row] for row in s] for s in seqs]


with torch.no_grad():
    hf = [model(torch.tensor([s])).logits[0].float().numpy() for s in ids]
logits = {"hf": hf}
for variant in file_types:
    logits[variant] = logits_of(variant_sd[variant])
for variant in file_types:
    d = max(float(np.max(np.abs(a - b))) for a, b in zip(logits[variant], hf))
    print(f"{variant}: max |logit - hf| = {d:.3g}")
print(f"max |logit| = {max(float(np.max(np.abs(a))) for a in hf):.3g}")
with open(os.path.join(out, "expected.json"), "w") as f:
    json.dump({"ids": ids, "logits": {k: as_lists(v) for k, v in logits.items()}}, f)
    f.write("\n")

# ---- the float codecs ------------------------------------------------------------------------

rows, cols = 3, 512
rng = np.random.default_rng(29)


def f16_bytes(lo, hi, n):
    return rng.uniform(lo, hi, size=n).astype("<f2").view(np.uint8).reshape(n, 2)


# Byte offsets of the f16 super-scales d and dmin in each K block (ggml's block structs).
k_scales = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}
manifest = {"rows": rows, "cols": cols, "types": {}}
for qt in [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]:
    name = qt.name.lower()
    block, size = GGML_QUANT_SIZES[qt]
    if qt in k_scales:
        n_blocks = rows * cols // block
        q = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
        for off in k_scales[qt]:
            q[:, off:off + 2] = f16_bytes(0.01, 0.05, n_blocks)
        q = q.reshape(rows, cols // block * size)
        how = "random blocks"
    else:
        q = quantize(rng.normal(0.0, 0.7, size=(rows, cols)).astype(np.float32), qt)
        how = "gguf.quants.quantize"
    values = dequantize(q, qt).astype(np.float32)
    assert values.shape == (rows, cols) and np.all(np.isfinite(values)), name
    q.tofile(os.path.join(codec_out, f"{name}.bin"))
    values.astype("<f4").tofile(os.path.join(codec_out, f"{name}.values.f32"))
    manifest["types"][name] = {"ggml_id": int(qt), "quantized_by": how}
    print(f"{name}: {q.size} bytes ({how})")
with open(os.path.join(codec_out, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=2)
    f.write("\n")

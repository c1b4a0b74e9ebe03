#!/usr/bin/env python3
"""Write an HF-packed BitNet b1.58 checkpoint (2B-4T layout) as a llama.cpp GGUF file, arch "bitnet".

usage: python3 scripts/reference/to_gguf_bitnet.py SRC_DIR OUT.gguf --wtype tq2_0|tq1_0|f16
           [--etype f16|q8_0|f32] [--max-layers N] [--verify]

SRC_DIR must hold model.safetensors, config.json and tokenizer.json (as written by
scripts/make_2b4t_shape.py). What it reads (microsoft/bitnet-b1.58-2B-4T, packed, autobitlinear):
  * `...proj.weight`       uint8 [out/4, in]; output row i*(out/4)+p sits in bits 2i..2i+1 of packed
                           row p, and the weight is code - 1 (code in {0,1,2})
  * `...proj.weight_scale` bf16 [1], multiplied in: W = scale * (code - 1)
  * bf16 norms and embeddings; the embeddings are tied (no lm_head), and llama.cpp's bitnet graph
    then uses token_embd as the output head.

Each tensor's one scale becomes the fp16 block scale `d` of every non-zero 256-weight TQ block
(d = |scale|), so the ternary codes are carried over exactly and no `.scale` tensor is needed
(llama.cpp treats it as optional). Needs numpy and gguf-py only, not torch. gguf-py is taken
from $GGUF_PY (llama-cpp-peer.sh points it at the llama.cpp sources it unpacked), else from
scripts/reference/llama_cpp_python-0.3.36/vendor/llama.cpp/gguf-py (the llama-cpp-python 0.3.36
source archive unpacked beside this script).
"""
import argparse, json, struct, sys, os
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, os.environ.get("GGUF_PY", str(HERE / "llama_cpp_python-0.3.36/vendor/llama.cpp/gguf-py")))
import gguf  # noqa: E402
from gguf import GGMLQuantizationType as QT  # noqa: E402


class ST:
    """Minimal safetensors reader (memory-mapped)."""
    def __init__(self, path):
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            self.hdr = json.loads(f.read(n))
        self.hdr.pop("__metadata__", None)
        self.off = 8 + n
        self.mm = np.memmap(path, dtype=np.uint8, mode="r")

    def raw(self, name):
        h = self.hdr[name]
        a, b = h["data_offsets"]
        return self.mm[self.off + a: self.off + b], h["dtype"], h["shape"]

    def f32(self, name):
        buf, dt, shape = self.raw(name)
        if dt == "BF16":
            u = np.frombuffer(buf, dtype=np.uint16).astype(np.uint32) << 16
            return u.view(np.float32).reshape(shape)
        if dt == "F16":
            return np.frombuffer(buf, dtype=np.float16).astype(np.float32).reshape(shape)
        if dt == "F32":
            return np.frombuffer(buf, dtype=np.float32).reshape(shape).copy()
        raise ValueError(f"{name}: unexpected dtype {dt}")

    def ternary(self, name):
        """-> float32 [out, in] = scale * (code - 1)."""
        buf, dt, shape = self.raw(name)
        assert dt == "U8", (name, dt)
        p = np.frombuffer(buf, dtype=np.uint8).reshape(shape)            # [out/4, in]
        codes = np.concatenate([(p >> np.uint8(2 * i)) & np.uint8(3) for i in range(4)], axis=0)  # row i*(out/4)+p
        assert codes.max() <= 2, f"{name}: code 3 present"
        scale = float(self.f32(name + "_scale").reshape(-1)[0])
        return (codes.astype(np.float32) - 1.0) * np.float32(scale), scale


def quant_rows(arr, qtype, chunk=8192):
    """Quantize row-chunks (rows are independent) to bound peak memory."""
    out = [gguf.quants.quantize(np.ascontiguousarray(arr[i:i + chunk], dtype=np.float32), qtype)
           for i in range(0, arr.shape[0], chunk)]
    return np.concatenate(out, axis=0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--wtype", default="tq2_0", choices=["tq2_0", "tq1_0", "f16"])
    ap.add_argument("--etype", default="f16", choices=["f16", "q8_0", "f32"])
    ap.add_argument("--max-layers", type=int, default=None, help="debug: only convert the first N layers")
    ap.add_argument("--verify", action="store_true", help="dequantize each ternary tensor and compare exactly")
    a = ap.parse_args()

    src = Path(a.src)
    cfg = json.loads((src / "config.json").read_text())
    st = ST(src / "model.safetensors")
    wq = {"tq2_0": QT.TQ2_0, "tq1_0": QT.TQ1_0, "f16": QT.F16}[a.wtype]
    eq = {"f16": QT.F16, "q8_0": QT.Q8_0, "f32": QT.F32}[a.etype]

    n_layer = cfg["num_hidden_layers"] if a.max_layers is None else a.max_layers
    d, ff = cfg["hidden_size"], cfg["intermediate_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    assert cfg.get("tie_word_embeddings", True), "untied lm_head not handled (bitnet graph uses token_embd)"

    arch = "bitnet"
    w = gguf.GGUFWriter(a.out, arch)
    w.add_name("bitnet-b1.58-2B-4T-shape (random weights)")
    w.add_context_length(cfg.get("max_position_embeddings", 4096))
    w.add_embedding_length(d)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(ff)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_dimension_count(d // nh)
    w.add_rope_freq_base(float(cfg["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_vocab_size(cfg["vocab_size"])
    ftype = {"tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0, "tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0,
             "f16": gguf.LlamaFileType.MOSTLY_F16}[a.wtype]
    w.add_file_type(ftype)

    # ---- vocab: gpt2-style from the byte-level tokenizer.json ----
    tj = json.loads((src / "tokenizer.json").read_text())
    nv = cfg["vocab_size"]
    toks = [None] * nv
    types = [gguf.TokenType.NORMAL] * nv
    for t, i in tj["model"]["vocab"].items():
        if i < nv:
            toks[i] = t
    for at in tj.get("added_tokens", []):
        if at["id"] < nv:
            toks[at["id"]] = at["content"]
            types[at["id"]] = gguf.TokenType.CONTROL if at.get("special") else gguf.TokenType.USER_DEFINED
    for i in range(nv):
        if toks[i] is None:
            toks[i] = f"[PAD{i}]"
            types[i] = gguf.TokenType.UNUSED
    merges = tj["model"].get("merges") or []
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    if not merges:  # llama.cpp's BPE loader requires the key to exist; one harmless merge suffices
        merges = ["\u0120 \u0120"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(toks)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg.get("bos_token_id", 128000))
    w.add_eos_token_id(cfg.get("eos_token_id", 128001))
    w.add_add_bos_token(False)

    # ---- tensors ----
    def put(name, arr, qtype):
        if qtype == QT.F32:
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
        elif qtype == QT.F16:
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float16))
        else:
            q = quant_rows(arr, qtype)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)

    put("token_embd.weight", st.f32("model.embed_tokens.weight"), eq)
    put("output_norm.weight", st.f32("model.norm.weight"), QT.F32)
    lin = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down"}
    nrm = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
           "self_attn.attn_sub_norm": "attn_sub_norm", "mlp.ffn_sub_norm": "ffn_sub_norm"}
    for L in range(n_layer):
        for hf, gg in nrm.items():
            put(f"blk.{L}.{gg}.weight", st.f32(f"model.layers.{L}.{hf}.weight"), QT.F32)
        for hf, gg in lin.items():
            W, scale = st.ternary(f"model.layers.{L}.{hf}.weight")
            put(f"blk.{L}.{gg}.weight", W, wq)
            if a.verify and wq != QT.F16:
                deq = gguf.quants.dequantize(quant_rows(W, wq), wq)
                err = np.abs(deq - W).max() / max(abs(scale), 1e-30)
                codes_ok = np.array_equal(np.sign(deq), np.sign(W))
                print(f"verify blk.{L}.{gg}: shape {W.shape} scale {scale:.6g} max|deq-W|/|s| {err:.2e} sign-exact {codes_ok}")
        print(f"layer {L} done", flush=True)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    print("wrote", a.out, os.path.getsize(a.out), "bytes")


if __name__ == "__main__":
    main()

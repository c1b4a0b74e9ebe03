"""Write a random checkpoint whose tensor names, shapes, dtypes and packing are exactly those of
microsoft/bitnet-b1.58-2B-4T (HF packed, autobitlinear, tied embeddings), with a byte-level
tokenizer.json padded to its 128256-token vocabulary. The weights are noise: the checkpoint is for
measuring time and memory at the real scale (and is the input scripts/reference/llama-cpp-peer.sh
expects), never for accuracy.
usage: python3 scripts/make_2b4t_shape.py OUT_DIR [--layers N]   (default 30 layers, 1.18 GB)"""
import json, os, sys, struct
import numpy as np

out = sys.argv[1]
layers = int(sys.argv[sys.argv.index("--layers") + 1]) if "--layers" in sys.argv else 30
H, I, NH, NKV, V = 2560, 6912, 20, 5, 128256
HD = H // NH
rng = np.random.default_rng(0)
os.makedirs(out, exist_ok=True)

def bf16(a):
    a = np.asarray(a, dtype=np.float32)
    return (a.view(np.uint32) >> 16).astype(np.uint16)

def packed(o, i):
    codes = rng.integers(0, 3, size=(o, i), dtype=np.uint8)  # value = code - 1
    p = np.zeros((o // 4, i), dtype=np.uint8)
    for k in range(4):
        p |= codes[k * (o // 4):(k + 1) * (o // 4)] << (2 * k)
    return p

tensors = {}  # name -> (dtype, shape, bytes)
def put(name, dtype, arr):
    tensors[name] = (dtype, list(arr.shape), np.ascontiguousarray(arr).tobytes())

put("model.embed_tokens.weight", "BF16", bf16(rng.standard_normal((V, H), dtype=np.float32) * 0.02))
put("model.norm.weight", "BF16", bf16(np.ones(H)))
for l in range(layers):
    p = f"model.layers.{l}."
    for n, (o, i) in {"self_attn.q_proj": (H, H), "self_attn.k_proj": (NKV * HD, H),
                      "self_attn.v_proj": (NKV * HD, H), "self_attn.o_proj": (H, H),
                      "mlp.gate_proj": (I, H), "mlp.up_proj": (I, H), "mlp.down_proj": (H, I)}.items():
        put(p + n + ".weight", "U8", packed(o, i))
        put(p + n + ".weight_scale", "BF16", bf16(np.array([1.0 / np.sqrt(i)])))
    put(p + "input_layernorm.weight", "BF16", bf16(np.ones(H)))
    put(p + "post_attention_layernorm.weight", "BF16", bf16(np.ones(H)))
    put(p + "self_attn.attn_sub_norm.weight", "BF16", bf16(np.ones(H)))
    put(p + "mlp.ffn_sub_norm.weight", "BF16", bf16(np.ones(I)))

hdr, off = {}, 0
for k in sorted(tensors):
    dt, shape, b = tensors[k]
    hdr[k] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(b)]}
    off += len(b)
hdr["__metadata__"] = {"format": "pt"}
h = json.dumps(hdr).encode()
h += b" " * ((8 - len(h) % 8) % 8)
with open(os.path.join(out, "model.safetensors"), "wb") as f:
    f.write(struct.pack("<Q", len(h))); f.write(h)
    for k in sorted(tensors):
        f.write(tensors[k][2])

cfg = {"architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "vocab_size": V,
       "hidden_size": H, "intermediate_size": I, "num_hidden_layers": layers,
       "num_attention_heads": NH, "num_key_value_heads": NKV, "hidden_act": "relu2",
       "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
       "tie_word_embeddings": True, "bos_token_id": 128000, "eos_token_id": 128001,
       "torch_dtype": "bfloat16",
       "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear",
                               "quantization_mode": "offline"}}
json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=2)

# byte-level BPE vocabulary (GPT-2 byte alphabet), no merges, padded to V with reserved tokens
bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
cs = bs[:]; n = 0
for b in range(256):
    if b not in bs:
        bs.append(b); cs.append(256 + n); n += 1
vocab = {chr(c): i for i, c in enumerate(cs)}
for i in range(256, 128000):
    vocab[f"<|reserved_{i}|>"] = i
specials = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001}
for i in range(128002, V):
    specials[f"<|reserved_special_{i}|>"] = i
vocab.update(specials)
tok = {"version": "1.0", "truncation": None, "padding": None,
       "added_tokens": [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                         "normalized": False, "special": True} for c, i in specials.items()],
       "normalizer": None,
       "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
       "post_processor": None,
       "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
       "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                 "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                 "ignore_merges": False, "vocab": vocab, "merges": []}}
json.dump(tok, open(os.path.join(out, "tokenizer.json"), "w"))
print(f"wrote {out}: {layers} layers, {off/1e9:.2f} GB")

"""Write a small random BitNet checkpoint in the packed layout of microsoft/bitnet-b1.58-2B-4T
(uint8 [out/4, in] weights, one bf16 weight_scale per linear, autobitlinear, offline mode)
together with the logits Hugging Face transformers computes for it (reference_logits.safetensors).
usage: python scripts/reference/make_hf_bitnet_fixture.py OUTDIR SEED HIDDEN INTER LAYERS HEADS KVHEADS VOCAB TIE
The parity fixture tests/fixtures/hf-bitnet-tiny is the output of
  python scripts/reference/make_hf_bitnet_fixture.py OUT 7 64 128 2 4 2 96 0
"""
import json, sys, os
import torch
from safetensors.torch import save_file
from transformers import BitNetForCausalLM
from transformers.integrations.bitnet import pack_weights

out, seed, hidden, inter, layers, heads, kv, vocab, tie = sys.argv[1], *map(int, sys.argv[2:10])
torch.manual_seed(seed)
os.makedirs(out, exist_ok=True)
head_dim = hidden // heads
cfg = {
    "architectures": ["BitNetForCausalLM"], "model_type": "bitnet",
    "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
    "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
    "hidden_act": "relu2", "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "tie_word_embeddings": bool(tie), "bos_token_id": 1, "eos_token_id": 2,
    "torch_dtype": "bfloat16",
    "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"},
}
json.dump(cfg, open(f"{out}/config.json", "w"), indent=2)

def ternary(o, i):
    w = torch.randint(-1, 2, (o, i), dtype=torch.int8)
    return pack_weights(w.clone()), w

t = {}
ref_weights = {}
t["model.embed_tokens.weight"] = (torch.randn(vocab, hidden) * 0.5).to(torch.bfloat16)
t["model.norm.weight"] = (1 + 0.1 * torch.randn(hidden)).to(torch.bfloat16)
if not tie:
    t["lm_head.weight"] = (torch.randn(vocab, hidden) * 0.05).to(torch.bfloat16)
shapes = {
    "self_attn.q_proj": (heads * head_dim, hidden), "self_attn.k_proj": (kv * head_dim, hidden),
    "self_attn.v_proj": (kv * head_dim, hidden), "self_attn.o_proj": (hidden, heads * head_dim),
    "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter),
}
for l in range(layers):
    p = f"model.layers.{l}."
    for name, (o, i) in shapes.items():
        packed, w = ternary(o, i)
        t[p + name + ".weight"] = packed
        t[p + name + ".weight_scale"] = torch.tensor([0.5 + torch.rand(1).item()], dtype=torch.bfloat16)
    for n, d in [("input_layernorm", hidden), ("post_attention_layernorm", hidden),
                 ("self_attn.attn_sub_norm", hidden), ("mlp.ffn_sub_norm", inter)]:
        t[p + n + ".weight"] = (1 + 0.1 * torch.randn(d)).to(torch.bfloat16)
save_file(t, f"{out}/model.safetensors", metadata={"format": "pt"})

model = BitNetForCausalLM.from_pretrained(out, dtype=torch.float32)
for mod in model.modules():  # compute the reference in float32 throughout
    for k, v in list(mod._parameters.items()):
        if v is not None and v.is_floating_point():
            mod._parameters[k] = torch.nn.Parameter(v.data.float(), requires_grad=False)
    for k, v in list(mod._buffers.items()):
        if v is not None and v.is_floating_point():
            mod._buffers[k] = v.float()
model.eval()
g = torch.Generator().manual_seed(seed + 1)
ids = torch.randint(0, vocab, (2, 16), generator=g)
with torch.no_grad():
    logits = model(ids).logits.float()
save_file({"input_ids": ids.to(torch.int64), "logits": logits.contiguous()}, f"{out}/reference_logits.safetensors")
print(out, "logits", tuple(logits.shape), "mean|logit|", logits.abs().mean().item())

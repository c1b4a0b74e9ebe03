#!/usr/bin/env python3
"""PEFT's side of the adapter check: load bitsvf's dequantized model with transformers (a
float BitNet: plain linears, no activation quantization), apply the PEFT LoRA adapter that
`bitsvf export-adapter --format peft` wrote, and compare its logits with those `bitsvf logits
--mode dense --no-act-quant --expert E` wrote for the same token ids.

    scripts/reference/torch-venv.sh            # torch, transformers, safetensors (+ pip install peft)
    bitsvf dequantize MODEL --out /tmp/deq
    bitsvf export-adapter E --model MODEL --format peft --out /tmp/adapter
    bitsvf logits MODEL --mode dense --no-act-quant --expert E --tokens "1,5,9;4,8,15" \
        --out /tmp/bitsvf-logits.safetensors
    python3 scripts/reference/peft_adapter_logits.py /tmp/deq /tmp/adapter /tmp/bitsvf-logits.safetensors

Prints the largest |Δ logit| with the adapter (the check: below 1e-4) and without it (how much
the adapter changes), and exits non-zero when the first is not below the bar.
"""
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

deq, adapter, ours = sys.argv[1:4]
bar = float(sys.argv[4]) if len(sys.argv) > 4 else 1e-4
theirs = load_file(ours)
ids = theirs["input_ids"]
want = theirs["logits"]

base = AutoModelForCausalLM.from_pretrained(deq, dtype=torch.float32)
base.eval()
with torch.no_grad():
    plain = base(input_ids=ids).logits
model = PeftModel.from_pretrained(base, adapter)
model.eval()
with torch.no_grad():
    got = model(input_ids=ids).logits

with_adapter = (got - want).abs().max().item()
without = (plain - want).abs().max().item()
print(f"max |logit difference| with the adapter: {with_adapter:.3e} (bar {bar:g}); "
      f"base alone: {without:.3e}")
sys.exit(0 if with_adapter < bar else 1)

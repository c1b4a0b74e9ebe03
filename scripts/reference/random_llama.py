"""Weights for a tiny random transformers Llama that give logits of order one, shared by
make_float_llama_fixture.py and llama_cpp_lora.py. The default initialisation leaves every
logit near zero, so greedy decoding and logit comparisons would hinge on near-ties."""

import torch


def scale_weights(model):
    """Redraw `model`'s parameters in place from torch's global generator, in parameter
    order: embeddings N(0, 0.5²), norm weights 1 + N(0, 0.1²), every other matrix N(0, 0.08²)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn_like(p) * 0.5)
            elif name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * 0.08)

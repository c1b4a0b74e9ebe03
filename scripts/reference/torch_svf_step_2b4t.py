"""PyTorch's SVF training step at microsoft/bitnet-b1.58-2B-4T's shapes, the peer of
`bitsvf train --parameterization low-rank` on a checkpoint from scripts/make_2b4t_shape.py.

The model is what a PyTorch user trains SVF on: the dequantized f32 model (vocab 128256, d 2560,
30 blocks, 20 query / 5 key-value heads of 128, ReLU² FFN of 6912 with BitNet's sub-norms,
tied embeddings; random weights, so time and memory only). Each of the 90 MLP matrices gets the
low-rank SVF delta y = x Wᵀ + ((x V_k) ⊙ σ_k ⊙ (z − 1)) U_kᵀ with k = 64, gradients to z only.
Activations stay f32 (no int8 quantization: cheaper for PyTorch than BitNet's BitLinear). One
step is the SFT loss (summed log-probabilities of the answer tokens) forward and backward over
PROMPTS sequences of TOKENS tokens, in micro-batches of MICRO with each block recomputed in the
backward pass (torch.utils.checkpoint) — the settings of the bitsvf run it is compared with.

    pip install torch
    python scripts/reference/torch_svf_step_2b4t.py [PROMPTS TOKENS MICRO STEPS [LAYERS]]

Prints the build time, seconds per step (each step after the first), tokens/s and the peak
resident memory (ru_maxrss).
"""
import resource
import sys
import time

import torch
from torch.utils.checkpoint import checkpoint

prompts, tokens, micro, steps, layers = 16, 64, 4, 2, 30
args = [int(a) for a in sys.argv[1:]]
prompts, tokens, micro, steps = (args + [prompts, tokens, micro, steps][len(args):])[:4]
if len(args) > 4:
    layers = args[4]
vocab, d, heads, kv_heads, hd, ffn, k = 128256, 2560, 20, 5, 128, 6912, 64
torch.manual_seed(0)
t0 = time.perf_counter()


def dense(o, i):
    # γ·W_t: a ternary matrix times its scale, as f32 (what dequantization gives).
    return torch.randint(-1, 2, (o, i), dtype=torch.int8).to(torch.float32) * 0.02


class SvfLinear(torch.nn.Module):
    """W plus the rank-k SVF delta; only z trains."""

    def __init__(self, o, i):
        super().__init__()
        self.w = dense(o, i)
        q_u, _ = torch.linalg.qr(torch.randn(o, k))
        q_v, _ = torch.linalg.qr(torch.randn(i, k))
        self.u_t, self.v = q_u.T.contiguous(), q_v.contiguous()
        self.sigma = torch.rand(k) + 0.5
        self.z = torch.nn.Parameter(torch.ones(k))

    def forward(self, x):
        return x @ self.w.T + ((x @ self.v) * (self.sigma * (self.z - 1))) @ self.u_t


def rms(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w


inv = 1.0 / 500000 ** (torch.arange(0, hd, 2).float() / hd)
angles = torch.outer(torch.arange(tokens).float(), inv)
angles = torch.cat([angles, angles], -1)
cos, sin = angles.cos(), angles.sin()


def rope(x):
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k_, self.v_ = dense(heads * hd, d), dense(kv_heads * hd, d), dense(kv_heads * hd, d)
        self.o = dense(d, heads * hd)
        self.gate, self.up, self.down = SvfLinear(ffn, d), SvfLinear(ffn, d), SvfLinear(d, ffn)
        self.n1, self.n2 = torch.ones(d), torch.ones(d)
        self.attn_sub, self.ffn_sub = torch.ones(heads * hd), torch.ones(ffn)

    def forward(self, x):
        b, t, _ = x.shape
        h = rms(x, self.n1)
        q = rope((h @ self.q.T).view(b, t, heads, hd).transpose(1, 2))
        kk = rope((h @ self.k_.T).view(b, t, kv_heads, hd).transpose(1, 2))
        vv = (h @ self.v_.T).view(b, t, kv_heads, hd).transpose(1, 2)
        kk = kk.repeat_interleave(heads // kv_heads, 1)
        vv = vv.repeat_interleave(heads // kv_heads, 1)
        a = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, is_causal=True)
        a = a.transpose(1, 2).reshape(b, t, heads * hd)
        x = x + rms(a, self.attn_sub) @ self.o.T
        h = rms(x, self.n2)
        g = torch.relu(self.gate(h)).pow(2) * self.up(h)
        return x + self.down(rms(g, self.ffn_sub))


emb = torch.randn(vocab, d) * 0.02
blocks = [Block() for _ in range(layers)]
norm = torch.ones(d)
zs = [m.z for b in blocks for m in (b.gate, b.up, b.down)]
build = time.perf_counter() - t0


def loss(ids):
    x = emb[ids]
    for b in blocks:
        x = checkpoint(b, x, use_reentrant=False)
    logits = rms(x, norm) @ emb.T
    lp = torch.log_softmax(logits[:, :-1], -1)
    # The answer: the last half of each sequence.
    half = tokens // 2
    return -lp[:, half - 1 :].gather(2, ids[:, half:].unsqueeze(2)).sum()


ids = (torch.arange(prompts * tokens) * 7919 + 13).remainder(vocab).view(prompts, tokens)
times = []
for s in range(steps):
    t = time.perf_counter()
    for z in zs:
        z.grad = None
    for m in range(0, prompts, micro):
        loss(ids[m : m + micro]).backward()
    times.append(time.perf_counter() - t)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
step = min(times[1:]) if len(times) > 1 else times[0]
print(
    f"torch {torch.__version__} threads {torch.get_num_threads()}: {layers} blocks, built in "
    f"{build:.0f} s; step ({prompts} x {tokens} tokens, micro-batch {micro}, checkpointed) "
    f"{step:.1f} s = {prompts * tokens / step:.1f} tokens/s (all steps: "
    f"{', '.join(f'{x:.1f}' for x in times)} s); peak RSS {peak:.2f} GB; "
    f"{sum(z.numel() for z in zs)} z parameters"
)

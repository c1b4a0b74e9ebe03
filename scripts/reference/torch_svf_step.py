"""The PyTorch side of bitsvf's SVF training-speed comparison: forward, and forward + backward,
of a Llama-style model in which every linear computes y = ((x V) * (s*z)) U^T, with gradients
to every z. The default shapes are those of `cargo bench --bench svf_step` (benches/svf_step.rs).
usage: python scripts/reference/torch_svf_step.py [VOCAB D LAYERS HEADS FFN BATCH TOKENS]"""
import time, sys, torch
torch.manual_seed(0)
vocab, d, L, H, ffn, B, T = 32000, 512, 8, 8, 1536, 4, 128
if len(sys.argv) > 1: vocab, d, L, H, ffn, B, T = map(int, sys.argv[1:8])
class ZLin(torch.nn.Module):
    def __init__(s, i, o):
        super().__init__(); r = min(i, o)
        s.ut = torch.randn(r, o) / o**0.5; s.v = torch.randn(i, r) / i**0.5
        s.s = torch.rand(r) + 0.5; s.z = torch.nn.Parameter(torch.ones(r))
    def forward(s, x): return ((x @ s.v) * (s.s * s.z)) @ s.ut
def rms(x, w): return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
hd = d // H
inv = 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd)
fr = torch.outer(torch.arange(T).float(), inv); fr = torch.cat([fr, fr], -1)
cos, sin = fr.cos(), fr.sin()
def rope(x):
    x1, x2 = x[..., :hd//2], x[..., hd//2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin
blocks = [dict(q=ZLin(d,d),k=ZLin(d,d),v=ZLin(d,d),o=ZLin(d,d),g=ZLin(d,ffn),u=ZLin(d,ffn),dn=ZLin(ffn,d)) for _ in range(L)]
emb = torch.randn(vocab, d) * 0.1; head = torch.randn(d, vocab) / d**0.5
mask = torch.full((T, T), float('-inf')).triu(1)
def logprob(tok):
    x = emb[tok]
    for b in blocks:
        h = rms(x, 1.0)
        q = rope(b['q'](h).view(B,T,H,hd).transpose(1,2)); k = rope(b['k'](h).view(B,T,H,hd).transpose(1,2))
        v = b['v'](h).view(B,T,H,hd).transpose(1,2)
        a = torch.softmax(q @ k.transpose(-1,-2) / hd**0.5 + mask, -1)
        x = x + b['o']((a @ v).transpose(1,2).reshape(B,T,d))
        h = rms(x, 1.0)
        x = x + b['dn'](torch.nn.functional.silu(b['g'](h)) * b['u'](h))
    lp = torch.log_softmax(rms(x, 1.0) @ head, -1)[:, :-1]
    return lp.gather(2, tok[:, 1:].unsqueeze(2)).sum()
tok = (torch.arange(B*T) * 7919 + 13).remainder(vocab).view(B, T)
zs = [m.z for b in blocks for m in b.values()]
def best(f, n=3):
    f(); ts = []
    for _ in range(n):
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    return min(ts)
with torch.no_grad(): fwd = best(lambda: logprob(tok).item())
def fb():
    for z in zs: z.grad = None
    logprob(tok).backward()
fwdbwd = best(fb)
print(f"torch {torch.__version__} threads={torch.get_num_threads()} fwd {fwd*1e3:.0f} ms  fwd+bwd {fwdbwd*1e3:.0f} ms  ({sum(z.numel() for z in zs)} z params)")

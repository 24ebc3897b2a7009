"""TransNormer T1 exactly as `models/transnormer_t1.tn` with `models/std.tn` computes it,
in PyTorch: the peer tnc's training step is timed and checked against.

Every choice below mirrors the model file (read it side by side):
- embedding gather, times √D when `embed_scale`, plus fairseq's sinusoidal positions
  (sin half, then cos half, frequencies exp(−i·ln 10⁴/(D/2 − 1)), from 0) when `abs_pos`;
- layers 0 … L/2 − 1 DiagAttention (blocks of `block` tokens, zero-padded, causal inside a
  block, q scaled by e^−½ before LRPE, ReLU of the masked scores, LRPE positions counted in
  the block), layers L/2 … L − 1 NormAttention (φ = elu on q and k, LRPE over the sequence,
  causal Σ_{m≤n} (q_n·k_m) v_m with no denominator, computed in chunks of 64);
- LRPE: a Householder reflection by the normalized buffer, then channel pairs rotated by
  t·θ_i; SRMSNorm x / (‖x‖₂/√d + 1e-8) over the merged heads, then Wo + bo;
- GLU (W1 x + b1) ⊙ (W2 x + b2) then W3 + b3 (the identity activation);
- pre-norm blocks, a final SRMSNorm, logits tied to the embedding, and the mean next-token
  cross-entropy over B·(N − 1) positions. Dropout is 0;
- tnc's derivative conventions where the function has none: sqrt'(0) = 0 (`safe_sqrt`).
"""

import math

import torch
import torch.nn.functional as F


def safe_sqrt(x):
    """sqrt with tnc's derivative 0 at 0 (`compiler/src/autodiff/rules.rs`), not +inf: a
    DiagAttention row whose ReLU scores are all 0 in every head is a zero row for SRMSNorm,
    where the chain rule's inf · 0 would make every earlier gradient NaN."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, 1.0)), 0.0)


def srms_norm(x, eps=1e-8):
    return x / (safe_sqrt((x * x).mean(-1, keepdim=True)) + eps)


def lrpe_rotate(x, theta, householder, pos):
    """x [..., T, E]; theta [E/2]; householder [E] (normalized here); pos [T]."""
    u = householder / torch.sqrt((householder * householder).sum())
    reflected = x - 2 * (x * u).sum(-1, keepdim=True) * u
    pairs = reflected.unflatten(-1, (x.shape[-1] // 2, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    angle = pos[:, None] * theta
    c, s = torch.cos(angle), torch.sin(angle)
    return torch.stack([even * c - odd * s, even * s + odd * c], -1).flatten(-2)


def split_heads(t, heads):
    b, n, d = t.shape
    return t.view(b, n, heads, d // heads).transpose(1, 2)


def merge_heads(t):
    b, h, n, e = t.shape
    return t.transpose(1, 2).reshape(b, n, h * e)


def causal_linear_attention(q, k, v, chunk=64):
    """O_n = Σ_{m≤n} (q_n·k_m) v_m, chunked: the masked quadratic form inside a chunk, the
    running state Σ kᵀv of the earlier chunks across them."""
    b, h, n, e = q.shape
    nc = -(-n // chunk)
    pad = nc * chunk - n
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    q, k, v = (t.reshape(b, h, nc, chunk, t.shape[-1]) for t in (q, k, v))
    kv = k.transpose(-1, -2) @ v  # [b, h, nc, d, e]
    state = torch.cat([torch.zeros_like(kv[:, :, :1]), kv[:, :, :-1]], 2).cumsum(2)
    mask = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    scores = (q @ k.transpose(-1, -2)).masked_fill(~mask, 0.0)
    o = q @ state + scores @ v
    return o.reshape(b, h, nc * chunk, -1)[:, :, :n]


def norm_attention(x, p, heads, lrpe):
    n = x.shape[1]
    q = F.elu(split_heads(x @ p["wq"] + p["bq"], heads))
    k = F.elu(split_heads(x @ p["wk"] + p["bk"], heads))
    v = split_heads(x @ p["wv"] + p["bv"], heads)
    if lrpe:
        pos = torch.arange(n, dtype=q.dtype, device=x.device)
        q = lrpe_rotate(q, p["lrpe.theta"], p["lrpe.householder"], pos)
        k = lrpe_rotate(k, p["lrpe.theta"], p["lrpe.householder"], pos)
    o = causal_linear_attention(q, k, v)
    return srms_norm(merge_heads(o)) @ p["wo"] + p["bo"]


def diag_attention(x, p, heads, block, lrpe):
    b, n, d = x.shape
    e = d // heads
    nb = -(-n // block)
    padded = nb * block

    def blocks(t):
        t = F.pad(split_heads(t, heads), (0, 0, 0, padded - n))
        return t.reshape(b, heads, nb, block, e)

    q = blocks((x @ p["wq"] + p["bq"]) * e**-0.5)
    k = blocks(x @ p["wk"] + p["bk"])
    v = blocks(x @ p["wv"] + p["bv"])
    if lrpe:
        pos = torch.arange(block, dtype=q.dtype, device=x.device)
        q = lrpe_rotate(q, p["lrpe.theta"], p["lrpe.householder"], pos)
        k = lrpe_rotate(k, p["lrpe.theta"], p["lrpe.householder"], pos)
    scores = q @ k.transpose(-1, -2)  # [b, h, nb, w, w]
    i = torch.arange(block, device=x.device)
    valid_key = (torch.arange(padded, device=x.device) < n).view(nb, 1, block)
    mask = (i[:, None] >= i[None, :]) & valid_key
    weights = torch.where(mask, torch.relu(scores), 0.0)
    o = (weights @ v).reshape(b, heads, padded, e)[:, :, :n]
    return srms_norm(merge_heads(o)) @ p["wo"] + p["bo"]


def glu(x, p):
    return ((x @ p["w1"] + p["b1"]) * (x @ p["w2"] + p["b2"])) @ p["w3"] + p["b3"]


def sinusoidal_positions(n, dim, dtype, device):
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=dtype, device=device) * -(math.log(10000.0) / (half - 1)))
    # Positions count from 2, fairseq's padding index + 1 (tnc's default offset).
    angle = (torch.arange(n, dtype=dtype, device=device) + 2)[:, None] * freq
    return torch.cat([torch.sin(angle), torch.cos(angle)], -1)


def loss(params, tokens, cfg):
    """The mean next-token cross-entropy of T1 (`cfg`: heads, layers, block, lrpe,
    abs_pos, embed_scale)."""
    table = params["embedding"]
    dim = table.shape[1]
    n = tokens.shape[1]
    x = table[tokens]
    if cfg["embed_scale"]:
        x = x * dim**0.5
    if cfg["abs_pos"]:
        x = x + sinusoidal_positions(n, dim, x.dtype, x.device)
    layers = cfg["layers"]
    for l in range(layers):
        attn = {k[len(f"layers.{l}.attn."):]: v for k, v in params.items() if k.startswith(f"layers.{l}.attn.")}
        mix = {k[len(f"layers.{l}.glu."):]: v for k, v in params.items() if k.startswith(f"layers.{l}.glu.")}
        h = srms_norm(x)
        if l < layers // 2:
            x = x + diag_attention(h, attn, cfg["heads"], cfg["block"], cfg["lrpe"])
        else:
            x = x + norm_attention(h, attn, cfg["heads"], cfg["lrpe"])
        x = x + glu(srms_norm(x), mix)
    logits = srms_norm(x)[:, :-1] @ table.t()
    # At least f32 (bf16 logits under autocast are widened; f64 stays f64).
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1).long())

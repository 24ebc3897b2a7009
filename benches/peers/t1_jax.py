"""TransNormer T1 in JAX, line for line the same model as `t1_torch.py` (whose docstring
lists what `models/transnormer_t1.tn` computes)."""

import math

import jax
import jax.numpy as jnp


def safe_sqrt(x):
    """sqrt with tnc's derivative 0 at 0 (see `t1_torch.safe_sqrt`)."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def srms_norm(x, eps=1e-8):
    return x / (safe_sqrt(jnp.mean(x * x, -1, keepdims=True)) + eps)


def lrpe_rotate(x, theta, householder, pos):
    u = householder / jnp.sqrt(jnp.sum(householder * householder))
    reflected = x - 2 * jnp.sum(x * u, -1, keepdims=True) * u
    pairs = reflected.reshape(x.shape[:-1] + (x.shape[-1] // 2, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    angle = pos[:, None] * theta
    c, s = jnp.cos(angle), jnp.sin(angle)
    return jnp.stack([even * c - odd * s, even * s + odd * c], -1).reshape(x.shape)


def split_heads(t, heads):
    b, n, d = t.shape
    return t.reshape(b, n, heads, d // heads).transpose(0, 2, 1, 3)


def merge_heads(t):
    b, h, n, e = t.shape
    return t.transpose(0, 2, 1, 3).reshape(b, n, h * e)


def causal_linear_attention(q, k, v, chunk=64):
    b, h, n, e = q.shape
    nc = -(-n // chunk)
    pad = nc * chunk - n
    if pad:
        q, k, v = (jnp.pad(t, ((0, 0), (0, 0), (0, pad), (0, 0))) for t in (q, k, v))
    q, k, v = (t.reshape(b, h, nc, chunk, t.shape[-1]) for t in (q, k, v))
    kv = jnp.einsum("bhcmd,bhcme->bhcde", k, v)
    state = jnp.cumsum(jnp.concatenate([jnp.zeros_like(kv[:, :, :1]), kv[:, :, :-1]], 2), 2)
    mask = jnp.tril(jnp.ones((chunk, chunk), bool))
    scores = jnp.where(mask, jnp.einsum("bhcid,bhcjd->bhcij", q, k), 0.0)
    o = jnp.einsum("bhcid,bhcde->bhcie", q, state) + jnp.einsum("bhcij,bhcje->bhcie", scores, v)
    return o.reshape(b, h, nc * chunk, -1)[:, :, :n]


def norm_attention(x, p, heads, lrpe):
    n = x.shape[1]
    q = jax.nn.elu(split_heads(x @ p["wq"] + p["bq"], heads))
    k = jax.nn.elu(split_heads(x @ p["wk"] + p["bk"], heads))
    v = split_heads(x @ p["wv"] + p["bv"], heads)
    if lrpe:
        pos = jnp.arange(n, dtype=q.dtype)
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
        t = jnp.pad(split_heads(t, heads), ((0, 0), (0, 0), (0, padded - n), (0, 0)))
        return t.reshape(b, heads, nb, block, e)

    q = blocks((x @ p["wq"] + p["bq"]) * e**-0.5)
    k = blocks(x @ p["wk"] + p["bk"])
    v = blocks(x @ p["wv"] + p["bv"])
    if lrpe:
        pos = jnp.arange(block, dtype=q.dtype)
        q = lrpe_rotate(q, p["lrpe.theta"], p["lrpe.householder"], pos)
        k = lrpe_rotate(k, p["lrpe.theta"], p["lrpe.householder"], pos)
    scores = jnp.einsum("bhcie,bhcje->bhcij", q, k)
    i = jnp.arange(block)
    valid_key = (jnp.arange(padded) < n).reshape(nb, 1, block)
    mask = (i[:, None] >= i[None, :]) & valid_key
    weights = jnp.where(mask, jax.nn.relu(scores), 0.0)
    o = jnp.einsum("bhcij,bhcje->bhcie", weights, v).reshape(b, heads, padded, e)[:, :, :n]
    return srms_norm(merge_heads(o)) @ p["wo"] + p["bo"]


def glu(x, p):
    return ((x @ p["w1"] + p["b1"]) * (x @ p["w2"] + p["b2"])) @ p["w3"] + p["b3"]


def sinusoidal_positions(n, dim, dtype):
    half = dim // 2
    freq = jnp.exp(jnp.arange(half, dtype=dtype) * -(math.log(10000.0) / (half - 1)))
    # Positions count from 2, fairseq's padding index + 1 (tnc's default offset).
    angle = (jnp.arange(n, dtype=dtype) + 2)[:, None] * freq
    return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], -1)


def loss(params, tokens, cfg):
    table = params["embedding"]
    dim = table.shape[1]
    n = tokens.shape[1]
    x = table[tokens]
    if cfg["embed_scale"]:
        x = x * dim**0.5
    if cfg["abs_pos"]:
        x = x + sinusoidal_positions(n, dim, x.dtype)
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
    logits = srms_norm(x)[:, :-1] @ table.T
    targets = tokens[:, 1:]
    lse = jax.nn.logsumexp(logits, -1)
    picked = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return jnp.mean(lse - picked)

"""One peer implementation of T1's training step (loss and every gradient), driven over
stdin by `run.py` so that every implementation is timed in the same run, interleaved.

    worker.py --impl torch-eager|torch-compile|torch-compile-bf16|torch-f64|jax
              --params P.safetensors --tokens T.safetensors --config '{"heads": 4, ...}'
              --threads 2

Commands, one per line; each answer is one JSON line on stdout:
    check REF.safetensors   loss and gradients against tnc's (`loss`, `grad.<name>`)
    time K                  K steps, each timed: {"times_ms": [...]}
    quit
"""

import argparse
import json
import os
import sys
import time

import numpy as np
from safetensors.numpy import load_file


def rel_l2(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def torch_step(impl, params, tokens, cfg, threads):
    """A function running one step and returning a function that reads its loss and
    gradients as numpy (outside the timed part)."""
    import torch

    import t1_torch

    torch.set_num_threads(threads)
    dtype = np.float64 if impl == "torch-f64" else np.float32
    p = {k: torch.from_numpy(v.astype(dtype)) for k, v in params.items()}
    trainable = [k for k in p if not k.endswith("householder")]
    for k in trainable:
        p[k].requires_grad_(True)
    tok = torch.from_numpy(tokens.astype(np.int64))
    f = t1_torch.loss
    if impl in ("torch-compile", "torch-compile-bf16"):
        f = torch.compile(f)
    bf16 = impl.endswith("bf16")

    def step():
        for k in trainable:
            p[k].grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = f(p, tok, cfg)
        loss.backward()
        return lambda: (float(loss.detach()), {k: p[k].grad.numpy() for k in trainable})

    return step


def jax_step(params, tokens, cfg):
    import jax
    import jax.numpy as jnp

    import t1_jax

    p = {k: jnp.asarray(v) for k, v in params.items()}
    tok = jnp.asarray(tokens.astype(np.int32))
    grad = jax.jit(jax.value_and_grad(lambda p, t: t1_jax.loss(p, t, cfg)))

    def step():
        loss, g = grad(p, tok)
        jax.block_until_ready(g)
        return lambda: (float(loss), {k: np.asarray(v) for k, v in g.items() if not k.endswith("householder")})

    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", required=True)
    ap.add_argument("--params", required=True)
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    params = load_file(a.params)
    tokens = load_file(a.tokens)["tokens"]
    cfg = json.loads(a.config)
    if a.impl == "jax":
        step = jax_step(params, tokens, cfg)
    else:
        step = torch_step(a.impl, params, tokens, cfg, a.threads)
    out = sys.stdout
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "quit":
            break
        if cmd[0] == "check":
            ref = load_file(cmd[1])
            loss, grads = step()()
            worst, worst_name = 0.0, ""
            for k, g in grads.items():
                # A non-finite gradient is the worst mismatch there is (a NaN would fail
                # every comparison, and so pass a `>` test).
                e = rel_l2(g, ref[f"grad.{k}"]) if np.isfinite(g).all() else float("inf")
                if e > worst:
                    worst, worst_name = e, k
            answer = {
                "loss": loss,
                "tnc_loss": float(ref["loss"]),
                "loss_rel": abs(loss - float(ref["loss"])) / abs(float(ref["loss"])),
                "grad_rel_l2_worst": worst,
                "grad_worst": worst_name,
                "grads": len(grads),
            }
        elif cmd[0] == "time":
            times = []
            for _ in range(int(cmd[1])):
                t = time.perf_counter()
                step()
                times.append((time.perf_counter() - t) * 1e3)
            answer = {"times_ms": times}
        else:
            answer = {"error": f"unknown command {cmd[0]!r}"}
        out.write(json.dumps(answer) + "\n")
        out.flush()


if __name__ == "__main__":
    main()

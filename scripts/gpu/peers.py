"""PyTorch peers for the linear-attention timing: the same function as
models/bench/linear_attention.tn, o_n = sum_{m<=n} (q_n . k_m) v_m and loss = mean(o^2),
timed forward (autograd recording, as in training) and forward + backward (dq, dk, dv).

    peers.py --batch 4 --heads 32 --dim 128 --seqs 2048,8192,32768 --iters 10,5,3 [--budget-s S]

Peers:
  quadratic   (q k^T masked to the causal triangle) v: O(N^2) time and memory;
  chunk_loop  chunks of 64 in a Python loop carrying the d x d state (intra-chunk
              masked product plus q times the state of earlier chunks);
  fla         flash-linear-attention's `chunk_simple_gla` (Triton kernels; no decay,
              scale 1, inputs [B, N, H, d]), from the fla-core wheel gpu-prepare.sh
              downloads (installed with --no-deps; skipped, and said so, when absent).
Each in f32 (TF32 off: PyTorch's default for matmul) and in bf16 (inputs, products and
state in bf16; the loss in f32). A shape whose O(N^2) scores would not fit is skipped;
an out-of-memory error is reported as such. Prints one JSON line per measurement.
"""

import argparse
import json
import sys
import time

import torch


def quadratic(q, k, v):
    n = q.shape[-2]
    s = q @ k.transpose(-1, -2)
    mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    return s.masked_fill(~mask, 0) @ v


def chunk_loop(q, k, v, c=64):
    b, h, n, d = q.shape
    e = v.shape[-1]
    state = q.new_zeros(b, h, d, e)
    mask = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    outs = []
    for s in range(0, n, c):
        qc, kc, vc = q[..., s : s + c, :], k[..., s : s + c, :], v[..., s : s + c, :]
        w = qc.shape[-2]
        intra = (qc @ kc.transpose(-1, -2)).masked_fill(~mask[:w, :w], 0) @ vc
        outs.append(intra + qc @ state)
        state = state + kc.transpose(-1, -2) @ vc
    return torch.cat(outs, dim=-2)


def fla_simple_gla(q, k, v):
    from fla.ops.simple_gla import chunk_simple_gla

    o, _ = chunk_simple_gla(q, k, v, scale=1.0)
    return o


def loss_of(o):
    return (o.float() ** 2).mean()


def time_ms(fn, iters, warmup):
    ts = []
    for i in range(warmup + iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            ts.append(start.elapsed_time(end))
    ts.sort()
    m = len(ts)
    return ts[m // 2] if m % 2 else (ts[m // 2 - 1] + ts[m // 2]) / 2


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--seqs", default="2048,8192,32768")
    p.add_argument("--iters", default="10,5,3")
    p.add_argument("--peers", default="quadratic,chunk_loop")
    p.add_argument("--dtypes", default="f32,bf16")
    p.add_argument("--budget-s", type=float, default=1e9, help="stop starting new measurements after this")
    a = p.parse_args()
    t0 = time.time()
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    total = torch.cuda.get_device_properties(dev).total_memory
    seqs = [int(s) for s in a.seqs.split(",")]
    iters = [int(s) for s in a.iters.split(",")]
    iters += [iters[-1]] * (len(seqs) - len(iters))
    fns = {"quadratic": quadratic, "chunk_loop": chunk_loop, "fla": fla_simple_gla}
    dts = {"f32": torch.float32, "bf16": torch.bfloat16}
    for n, k_iters in zip(seqs, iters):
        for peer in a.peers.split(","):
            for dname in a.dtypes.split(","):
                rec = {"impl": "torch-" + peer, "dtype": dname, "model": "linear_attention",
                       "sizes": {"B": a.batch, "N": n}}
                dt = dts[dname]
                esize = torch.finfo(dt).bits // 8
                if time.time() - t0 > a.budget_s:
                    rec["error"] = "skipped (time budget)"
                    print(json.dumps(rec), flush=True)
                    continue
                if peer == "quadratic" and 3 * a.batch * a.heads * n * n * esize > 0.8 * total:
                    rec["error"] = "skipped (N^2 scores need %.0f GiB)" % (3 * a.batch * a.heads * n * n * esize / 2**30)
                    print(json.dumps(rec), flush=True)
                    continue
                fn = fns[peer]
                if peer == "fla":
                    try:
                        import fla.ops.simple_gla  # noqa: F401
                    except Exception as e:  # not installed, or it does not import here
                        rec["error"] = "fla unavailable: " + str(e).splitlines()[0][:100]
                        print(json.dumps(rec), flush=True)
                        continue
                try:
                    g = torch.Generator(device=dev).manual_seed(0)
                    # fla takes [B, N, H, d]; the others [B, H, N, d].
                    shape = (a.batch, n, a.heads, a.dim) if peer == "fla" else (a.batch, a.heads, n, a.dim)
                    q, k, v = (torch.rand(shape, generator=g, device=dev, dtype=dt) * 2 - 1 for _ in range(3))
                    for t in (q, k, v):
                        t.requires_grad_(True)

                    def fwd():
                        loss_of(fn(q, k, v))

                    def fwd_bwd():
                        for t in (q, k, v):
                            t.grad = None
                        loss_of(fn(q, k, v)).backward()

                    warm = 1 if n > 4096 else 2
                    rec["forward_ms"] = time_ms(fwd, k_iters, warm)
                    rec["fwd_bwd_ms"] = time_ms(fwd_bwd, k_iters, warm)
                except torch.cuda.OutOfMemoryError:
                    rec["error"] = "out of memory"
                except Exception as e:  # other CUDA or Triton errors: report, go on
                    rec["error"] = (str(e).splitlines() or [type(e).__name__])[0][:120]
                finally:
                    q = k = v = None
                    torch.cuda.empty_cache()
                print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    sys.exit(main())

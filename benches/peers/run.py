"""Times tnc's training step of T1 (loss and every gradient) side by side with its peers,
in one run, interleaved, and checks that every peer computes tnc's loss and gradients.

Called by `scripts/bench-peers.sh`, which builds tnc, compiles the bundles and writes each
variant's initial parameters; see there for the options. For every (variant, N):

1. tokens are drawn (seed 0) and the biases, zero at initialization, are set to small
   random values so that the check covers them;
2. `tnc-run --grad` computes tnc's loss and gradients; every peer computes its own on the
   same parameters and tokens and reports the relative difference (L2 over each tensor);
3. every peer is warmed up (torch.compile and jit compile here), then `--rounds` rounds
   each time `--steps` steps of every implementation, in an order that rotates per round,
   so that no implementation always runs after the same neighbour.

Prints one Markdown table per run (median and min of each implementation, each time over
tnc's median of the same variant and length) and writes every time to `--json`.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
from safetensors.numpy import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = ["torch-eager", "torch-compile", "torch-compile-bf16", "jax"]
# A peer's result matches tnc's when within this relative L2 over each tensor. In f64 the
# peer and tnc's interpreter agree to ~1e-14 (`f64_check`). In f32 the DiagAttention
# layers' gradients are ill-conditioned (SRMSNorm of nearly zero rows, where ε = 1e-8
# amplifies rounding): on T1 as shipped, PyTorch's and JAX's f32 gradients are 1.5e-3 from
# the f64 ones (measured; tnc's f32 ones 1e-5), the peers' model 2e-6. bf16 autocast
# rounds every product's operands to 8 bits of mantissa: ~1e-2 typically, ~9e-2 on those
# same gradients. On a CPU without AMX (Emerald Rapids VM, 2026-12-03) PyTorch's bf16
# autocast took another path and one gradient was 0.32 off (layers.2.attn.wk of the peers'
# model; its loss within 4e-6), so the bf16 peer is held to 0.5: a wrong model is off by
# ~1. tnc's own bf16 stays at 0.15.
TOLERANCE = {"torch-compile-bf16": 0.5, "tnc-bf16": 0.15}
F32_TOLERANCE = 5e-3
F64_TOLERANCE = 1e-10


def log(*a):
    print(*a, file=sys.stderr, flush=True)


class Worker:
    def __init__(self, impl, params, tokens, config, threads, python):
        self.impl = impl
        self.proc = subprocess.Popen(
            [python, os.path.join(HERE, "worker.py"), "--impl", impl, "--params", params, "--tokens", tokens,
             "--config", json.dumps(config), "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, cmd):
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"peer {self.impl} exited (status {self.proc.wait()})")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"peer {self.impl}: {answer['error']}")
        return answer

    def close(self):
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        self.proc.wait()


def tnc_times(tnc_run, bundle, params, tokens, batch, seq, steps, threads):
    out = subprocess.run(
        [tnc_run, "bench", bundle, "--device", "cpu", "--batch", str(batch), "--seq", str(seq), "--inputs", tokens,
         "--params", params, "--iters", str(steps), "--warmup", "1", "--threads", str(threads)],
        check=True, capture_output=True, text=True).stdout
    line = next(l for l in out.splitlines() if l.startswith("BENCH_JSON "))
    return json.loads(line[len("BENCH_JSON "):])["fwd_bwd_all_ms"]


def compare_files(got_path, want_path):
    """Loss and gradients of one run against another's (as the workers' `check` does)."""
    got, want = load_file(got_path), load_file(want_path)
    worst, worst_name = 0.0, ""
    for k in (k for k in want if k.startswith("grad.")):
        g = got[k]
        e = float(np.linalg.norm(g.astype(np.float64) - want[k]) / max(np.linalg.norm(want[k].astype(np.float64)), 1e-30))
        if not np.isfinite(g).all():
            e = float("inf")
        if e > worst:
            worst, worst_name = e, k[len("grad."):]
    loss, ref = float(got["loss"]), float(want["loss"])
    return {"loss": loss, "tnc_loss": ref, "loss_rel": abs(loss - ref) / abs(ref), "grad_rel_l2_worst": worst,
            "grad_worst": worst_name}


def check_inputs(work, variant, init, vocab, batch, seq):
    """The tokens and the parameters of the check and the timing (biases made non-zero)."""
    rng = np.random.default_rng(0)
    tokens = os.path.join(work, f"{variant}-N{seq}-tokens.safetensors")
    save_file({"tokens": rng.integers(0, vocab, (batch, seq), dtype=np.int32)}, tokens)
    params = {k: v.copy() for k, v in load_file(init).items()}
    for k, v in params.items():
        if k.rsplit(".", 1)[-1].startswith("b"):
            params[k] = (0.1 * rng.standard_normal(v.shape)).astype(np.float32)
    path = os.path.join(work, f"{variant}-params.safetensors")
    save_file(params, path)
    return tokens, path


def f64_check(a, variant, config, work):
    """PyTorch in f64 against tnc's interpreter in f64 (`tnc run --dtype f64`) at B 2,
    N 100 (a partial DiagAttention block): the peer is the same function as tnc's model
    to rounding, so the f32 comparisons measure precision only."""
    batch, seq = 2, 100
    tokens, params = check_inputs(work, f"{variant}-f64", os.path.join(work, f"{variant}-init.safetensors"),
                                  a.vocab, batch, seq)
    ref = os.path.join(work, f"{variant}-f64-interpreter.safetensors")
    sets = [x for s in config["sets"] for x in ("--set", s)]
    subprocess.run([a.tnc, "run", a.model, *sets, "--inputs", tokens, "--params", params, "--dtype", "f64", "--grad",
                    "--out", ref], check=True, capture_output=True)
    w = Worker("torch-f64", params, tokens, config, a.threads, sys.executable)
    c = w.ask(f"check {ref}")
    w.close()
    c["ok"] = c["loss_rel"] <= F64_TOLERANCE and c["grad_rel_l2_worst"] <= F64_TOLERANCE
    log(f"   f64: PyTorch against tnc's interpreter, loss {c['loss_rel']:.1e}, worst gradient "
        f"{c['grad_rel_l2_worst']:.1e} ({c['grad_worst']}){'' if c['ok'] else '  MISMATCH'}")
    return c


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tnc-run", required=True)
    ap.add_argument("--tnc", required=True, help="the tnc binary (its interpreter runs the f64 check)")
    ap.add_argument("--model", required=True, help="the model file the bundles were compiled from")
    ap.add_argument("--work", required=True, help="directory with VARIANT.tnb/, VARIANT-init.safetensors")
    ap.add_argument("--variant", action="append", required=True,
                    help="NAME=JSON config of the peers (heads, layers, block, lrpe, abs_pos, embed_scale) and the "
                         "model's --set values (sets)")
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, action="append", required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    peers = [p for p in a.peers.split(",") if p]
    results = []
    failed = []
    for spec in a.variant:
        variant, config = spec.split("=", 1)
        config = json.loads(config)
        bundle = os.path.join(a.work, f"{variant}.tnb")
        log(f"== {variant}")
        f64 = f64_check(a, variant, config, a.work)
        if not f64["ok"]:
            failed.append(f"torch-f64 {variant}")
        for seq in a.seq:
            log(f"== {variant}, B {a.batch}, N {seq}")
            tokens, params = check_inputs(a.work, variant, os.path.join(a.work, f"{variant}-init.safetensors"),
                                          a.vocab, a.batch, seq)
            ref = os.path.join(a.work, f"{variant}-N{seq}-tnc.safetensors")
            subprocess.run([a.tnc_run, bundle, "--device", "cpu", "--inputs", tokens, "--params", params, "--out",
                            ref, "--grad", "--threads", str(a.threads)], check=True, capture_output=True)
            workers = []
            checks = {}
            # tnc with bf16 products, when its bundle is there: checked like a peer.
            tnc_impls = {"tnc": bundle}
            bundle16 = os.path.join(a.work, f"{variant}-bf16.tnb")
            if os.path.isdir(bundle16):
                tnc_impls["tnc-bf16"] = bundle16
                ref16 = os.path.join(a.work, f"{variant}-N{seq}-tnc-bf16.safetensors")
                subprocess.run([a.tnc_run, bundle16, "--device", "cpu", "--inputs", tokens, "--params", params, "--out",
                                ref16, "--grad", "--threads", str(a.threads)], check=True, capture_output=True)
                c = compare_files(ref16, ref)
                c["ok"] = c["loss_rel"] <= TOLERANCE["tnc-bf16"] and c["grad_rel_l2_worst"] <= TOLERANCE["tnc-bf16"]
                checks["tnc-bf16"] = c
                log(f"   tnc-bf16: loss {c['loss']:.6f} (tnc {c['tnc_loss']:.6f}), worst gradient rel L2 "
                    f"{c['grad_rel_l2_worst']:.2e} ({c['grad_worst']}){'' if c['ok'] else '  MISMATCH'}")
                if not c["ok"]:
                    failed.append(f"tnc-bf16 {variant} N {seq}")
            for impl in peers:
                w = Worker(impl, params, tokens, config, a.threads, sys.executable)
                workers.append(w)
                t = time.perf_counter()
                c = w.ask(f"check {ref}")
                c["first_step_s"] = time.perf_counter() - t
                tol = TOLERANCE.get(impl, F32_TOLERANCE)
                c["ok"] = c["loss_rel"] <= tol and c["grad_rel_l2_worst"] <= tol
                checks[impl] = c
                log(f"   {impl}: loss {c['loss']:.6f} (tnc {c['tnc_loss']:.6f}), worst gradient rel L2 "
                    f"{c['grad_rel_l2_worst']:.2e} ({c['grad_worst']}), first step {c['first_step_s']:.1f} s"
                    f"{'' if c['ok'] else '  MISMATCH'}")
                if not c["ok"]:
                    failed.append(f"{impl} {variant} N {seq}")
                w.ask("time 1")  # warm-up
            order = list(tnc_impls) + peers
            times = {impl: [] for impl in order}
            for r in range(a.rounds):
                turn = order[r % len(order):] + order[:r % len(order)]
                for impl in turn:
                    time.sleep(0.2)  # let the previous implementation's spinning threads settle
                    if impl in tnc_impls:
                        ts = tnc_times(a.tnc_run, tnc_impls[impl], params, tokens, a.batch, seq, a.steps, a.threads)
                    else:
                        ts = next(w for w in workers if w.impl == impl).ask(f"time {a.steps}")["times_ms"]
                    times[impl] += ts
                log(f"   round {r + 1}/{a.rounds}: " + ", ".join(
                    f"{i} {statistics.median(t):.0f} ms" for i, t in times.items()))
            for w in workers:
                w.close()
            results.append({"variant": variant, "config": config, "batch": a.batch, "seq": seq, "times_ms": times,
                            "checks": checks, "f64_check": f64})
    with open(a.json, "w") as f:
        json.dump({"threads": a.threads, "results": results}, f, indent=1)
    print_table(results)
    if failed:
        log("MISMATCH: " + "; ".join(failed))
        sys.exit(1)


def print_table(results):
    cols = [(r["variant"], r["seq"]) for r in results]
    print("| implementation | " + " | ".join(f"{v}, N {n}: median / min (× tnc)" for v, n in cols) + " |")
    print("|---|" + "---:|" * len(cols))
    impls = list(results[0]["times_ms"])
    for impl in impls:
        cells = []
        for r in results:
            t = r["times_ms"][impl]
            base = statistics.median(r["times_ms"]["tnc"])
            med = statistics.median(t)
            cells.append(f"{med:.0f} / {min(t):.0f} ms ({med / base:.2f}×)")
        print(f"| {impl} | " + " | ".join(cells) + " |")
    print()
    print("Checks (relative L2 against tnc's loss and gradients on the same parameters and tokens):")
    for variant in dict.fromkeys(r["variant"] for r in results):
        c = next(r["f64_check"] for r in results if r["variant"] == variant)
        print(f"- {variant}, B 2, N 100, PyTorch in f64 against tnc's interpreter in f64: loss {c['loss_rel']:.1e}, "
              f"worst gradient {c['grad_rel_l2_worst']:.1e}{'' if c['ok'] else ' MISMATCH'}")
    for r in results:
        for impl, c in r["checks"].items():
            print(f"- {r['variant']}, N {r['seq']}, {impl}: loss {c['loss_rel']:.1e}, worst gradient "
                  f"{c['grad_rel_l2_worst']:.1e} ({c['grad_worst']}){'' if c['ok'] else ' MISMATCH'}")


if __name__ == "__main__":
    main()

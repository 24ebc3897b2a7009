"""tnc's GEMM tiles against cuBLAS on a model's own products.

    gemms.py extract CPU_MANIFEST B N > gemms.json
        (on the development machine) the products of a CPU bundle of the model — its
        library GEMM nodes, named like the GPU bundle's tiled kernels — with every size
        evaluated at B and N, and how often each runs in forward + backward
    gemms.py compare gemms.json PROFILE_LOG [--iters K] [--dtype f32|bf16] [--peak TFLOPS]
                     [--runtime-cublas PROFILE_LOG]
        (on the GPU) each product timed with torch.matmul (cuBLAS; f32 with TF32 off, or
        bf16 on tensor cores with f32 accumulation; row-major operands) next to the time
        tnc's tiled kernel of the same name took in `TNC_PROFILE=1 tnc-run bench`
        (PROFILE_LOG), as a table and JSON lines; with --peak, each rate as a fraction of
        that peak (e.g. 989 for an H100/H200's dense bf16 tensor cores, 67 for its f32 FMA);
        with --runtime-cublas, also the time of the same product as tnc's runtime calls
        cuBLAS for it (the profile of the model compiled with `--gemm cublas`)
"""

import json
import re
import sys


def poly(p, env):
    if isinstance(p, int):
        return p
    total = 0
    for t in p:
        v = t["coeff"]
        for a in t["atoms"]:
            if isinstance(a, str):
                v *= env[a]
            else:
                v *= -(-poly(a["ceil"], env) // a["div"])
        total += v
    return total


def extract(manifest, b, n):
    m = json.load(open(manifest))
    env = {"B": b, "N": n}
    count = {}
    for entry in ("forward", "backward"):
        for s in m["entry_points"].get(entry, []):
            # A run (format version 2) stands for `repeat` copies of its steps.
            for step in s["steps"] if "repeat" in s else [s]:
                count[step["kernel"]] = count.get(step["kernel"], 0) + s.get("repeat", 1)
    out = []
    for i, k in enumerate(m["kernels"]):
        g = k.get("gemm")
        # The einsums' products (`g<group>_gemm`), which GPU bundles tile under the same
        # names; the cross-entropy's chunks have kernels of their own on GPUs.
        if not g or i not in count or not k["name"].endswith("_gemm"):
            continue
        # Launch arguments (a vocabulary chunk's start) do not change a product's shape.
        env_k = dict(env, **{a: 0 for a in k.get("args", [])})
        batch = 1
        for ax in g["batch"]:
            batch *= poly(ax["extent"], env_k)
        out.append({"name": k["name"], "batch": batch, "m": poly(g["m"], env_k), "n": poly(g["n"], env_k),
                    "k": poly(g["k"], env_k), "launches": count[i]})
    json.dump({"B": b, "N": n, "gemms": out}, sys.stdout, indent=1)
    return 0


def profile_times(profile):
    """Milliseconds per launch of each kernel in a `TNC_PROFILE=1` log."""
    total = {}
    for line in open(profile):
        m = re.match(r"\s+([0-9.]+) ms\s+[0-9.]+%\s+(\d+)× (\S+)", line)
        if m:
            ms, count, name = float(m.group(1)), int(m.group(2)), m.group(3)
            t = total.setdefault(name, [0.0, 0])
            t[0] += ms
            t[1] += count
    return {name: ms / count for name, (ms, count) in total.items() if count}


def compare(gemms, profile, iters, dtype="f32", peak=None, runtime_cublas=None):
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    dt = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
    spec = json.load(open(gemms))
    tnc = profile_times(profile)
    # The same products as tnc's runtime computes them with cuBLAS (`--gemm cublas`).
    through = profile_times(runtime_cublas) if runtime_cublas else {}
    print("%s products%s" % (dtype, " (rates as %% of %g TFLOP/s)" % peak if peak else ""))
    print("%-12s %5s %7s %7s %7s  %10s %10s %10s %7s %9s %9s" % (
        "kernel", "batch", "M", "N", "K", "tnc ms", "tnc+cuBLAS", "cuBLAS ms", "ratio", "tnc TF/s", "cuBLAS"))
    tot_tnc = tot_ref = 0.0
    for g in spec["gemms"]:
        a = torch.randn(g["batch"], g["m"], g["k"], device="cuda", dtype=dt)
        b = torch.randn(g["batch"], g["k"], g["n"], device="cuda", dtype=dt)
        for _ in range(2):
            torch.bmm(a, b)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            torch.bmm(a, b)
        end.record()
        torch.cuda.synchronize()
        ref = start.elapsed_time(end) / iters
        per = tnc.get(g["name"])
        via = through.get(g["name"])
        flop = 2.0 * g["batch"] * g["m"] * g["n"] * g["k"]
        rate = lambda ms: flop / (ms * 1e-3) / 1e12 if ms else None  # noqa: E731
        shown = lambda r: "-" if r is None else ("%.1f%%" % (100 * r / peak) if peak else "%.1f" % r)  # noqa: E731
        rec = dict(g, dtype=dtype, cublas_ms=ref, tnc_ms=per, tnc_cublas_ms=via, tnc_tflops=rate(per),
                   cublas_tflops=rate(ref))
        print("%-12s %5d %7d %7d %7d  %10s %10s %10.4f %7s %9s %9s" % (
            g["name"], g["batch"], g["m"], g["n"], g["k"], "%.4f" % per if per is not None else "-",
            "%.4f" % via if via is not None else "-", ref,
            "%.2f" % (per / ref) if per is not None and ref > 0 else "-", shown(rate(per)), shown(rate(ref))))
        if per is not None:
            tot_tnc += per * g["launches"]
            tot_ref += ref * g["launches"]
        print("GEMM_JSON " + json.dumps(rec), file=sys.stderr)
    if tot_ref > 0:
        print("forward + backward products: tnc %.3f ms, cuBLAS %.3f ms (%.2fx)" % (tot_tnc, tot_ref, tot_tnc / tot_ref))
    return 0


def main(argv):
    if len(argv) >= 5 and argv[1] == "extract":
        return extract(argv[2], int(argv[3]), int(argv[4]))
    if len(argv) >= 4 and argv[1] == "compare":
        iters = int(argv[argv.index("--iters") + 1]) if "--iters" in argv else 10
        dtype = argv[argv.index("--dtype") + 1] if "--dtype" in argv else "f32"
        peak = float(argv[argv.index("--peak") + 1]) if "--peak" in argv else None
        runtime = argv[argv.index("--runtime-cublas") + 1] if "--runtime-cublas" in argv else None
        return compare(argv[2], argv[3], iters, dtype, peak, runtime)
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))

#!/usr/bin/env python3
"""Run PTX emitted by tnc's NVPTX back end on a GPU and compare with the reference executor.

Usage: ptx_run.py DIR SET...   (DIR as written by the `dump_gpu_cases` test in
compiler/tests/ptx.rs: `TNC_GPU_CASES=DIR cargo test -p tnc-compiler --test ptx -- --ignored
dump_gpu_cases`).

For each case: upload the inputs, build the `buffers` and `sizes` tables in device memory,
launch the kernel over `0..extent/3` and `extent/3..extent` with the launch shape of
`backend::gpu_launch` (blocks of 256 threads, ceil(range / 256) blocks; a block kernel,
whose case has `threads`, gets one block of that many threads per iteration), and compare every
written buffer (prefilled with 0xFF bytes where the set says every element is written) with the executor's: f32 within 1e-4 relative (to the element, with a floor of
1e-3 of the buffer's scale), integers and masks exactly. Needs only the CUDA driver
(libcuda.so.1) and the Python standard library.
"""
import ctypes
import json
import math
import struct
import sys
import time

cuda = ctypes.CDLL("libcuda.so.1")
BLOCK = 256


def check(r, what):
    if r != 0:
        s = ctypes.c_char_p()
        cuda.cuGetErrorString(r, ctypes.byref(s))
        raise RuntimeError(f"{what}: CUDA error {r} ({s.value.decode() if s.value else '?'})")


def alloc(data):
    p = ctypes.c_uint64()
    check(cuda.cuMemAlloc_v2(ctypes.byref(p), max(len(data), 1)), "cuMemAlloc")
    if data:
        check(cuda.cuMemcpyHtoD_v2(p, data, len(data)), "cuMemcpyHtoD")
    return p


def load(ptx_text):
    mod = ctypes.c_void_p()
    log = ctypes.create_string_buffer(1 << 16)
    opts = (ctypes.c_int * 2)(5, 6)  # CU_JIT_ERROR_LOG_BUFFER, CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES
    vals = (ctypes.c_void_p * 2)(ctypes.cast(log, ctypes.c_void_p), ctypes.c_void_p(len(log)))
    r = cuda.cuModuleLoadDataEx(ctypes.byref(mod), ptx_text.encode() + b"\0", 2, opts, vals)
    if r != 0:
        print(log.value.decode(errors="replace"))
    check(r, "cuModuleLoadDataEx")
    return mod


def values(raw, elem):
    """Element values of a buffer; 16-bit floats widened to floats (compared like f32)."""
    if elem == "f32":
        return struct.unpack(f"<{len(raw) // 4}f", raw)
    if elem == "f16":
        return struct.unpack(f"<{len(raw) // 2}e", raw)
    if elem == "bf16":
        halves = struct.unpack(f"<{len(raw) // 2}H", raw)
        return struct.unpack(f"<{len(halves)}f", struct.pack(f"<{len(halves)}I", *[h << 16 for h in halves]))
    if elem == "i32":
        return struct.unpack(f"<{len(raw) // 4}i", raw)
    return raw


def run_set(d, name):
    spec = json.load(open(f"{d}/{name}.json"))
    t0 = time.time()
    mod = load(open(f"{d}/{name}.ptx").read())
    print(f"{name}: module loaded in {time.time() - t0:.2f} s, {len(spec['cases'])} cases")
    worst, worst_at, failures = 0.0, "", 0
    funcs = {}
    for ci, case in enumerate(spec["cases"]):
        k = case["kernel"]
        if k not in funcs:
            f = ctypes.c_void_p()
            check(cuda.cuModuleGetFunction(ctypes.byref(f), mod, k.encode()), f"cuModuleGetFunction {k}")
            funcs[k] = f
        bufs = []
        for b in case["buffers"]:
            data = open(f"{d}/{b['in']}", "rb").read()
            if b["access"] == "w" and spec["prefill"]:
                data = b"\xff" * len(data)  # NaN / -1 / 0xff: an element never written fails
            bufs.append((alloc(data), len(data)))
        table = alloc(struct.pack(f"<{len(bufs)}Q", *[p.value for p, _ in bufs]))
        sizes = alloc(struct.pack(f"<{len(case['sizes'])}q", *case["sizes"]))
        n = case["extent"]
        threads = case.get("threads")
        for begin, end in [(0, n // 3), (n // 3, n)]:
            # A block kernel: one block of `threads` per iteration; otherwise one thread
            # per iteration in blocks of BLOCK.
            block = threads or BLOCK
            grid = end - begin if threads else (end - begin + BLOCK - 1) // BLOCK
            if grid <= 0:
                continue
            args = [ctypes.c_uint64(table.value), ctypes.c_uint64(sizes.value), ctypes.c_int64(begin), ctypes.c_int64(end)]
            params = (ctypes.c_void_p * 4)(*[ctypes.cast(ctypes.byref(a), ctypes.c_void_p) for a in args])
            shared = case.get("shared", 0)
            if shared > 48 * 1024:
                # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: the opt-in beyond 48 KB.
                check(cuda.cuFuncSetAttribute(funcs[k], 8, shared), f"shared memory of {k}")
            check(cuda.cuLaunchKernel(funcs[k], grid, 1, 1, block, 1, 1, shared, None, params, None), f"launch {k}")
        check(cuda.cuCtxSynchronize(), f"{name} case {ci} kernel {k}")
        for b, (p, size) in zip(case["buffers"], bufs):
            if b["access"] != "r":
                got = ctypes.create_string_buffer(size)
                check(cuda.cuMemcpyDtoH_v2(got, p, size), "cuMemcpyDtoH")
                g = values(got.raw, b["elem"])
                w = values(open(f"{d}/{b['want']}", "rb").read(), b["elem"])
                at = f"{name} case {ci} `{k}` buffer `{b['name']}`"
                if b["elem"] in ("f32", "bf16", "f16"):
                    finite = [abs(x) for x in w if math.isfinite(x)]
                    scale = max(finite) if finite else 0.0
                    bad = 0
                    for j, (a, e) in enumerate(zip(g, w)):
                        if a == e or (math.isnan(a) and math.isnan(e)):
                            continue
                        if math.isinf(a) or math.isinf(e) or math.isnan(a) or math.isnan(e):
                            err = math.inf
                        else:
                            err = abs(a - e) / max(abs(e), 1e-3 * scale, 1e-38)
                        if err > worst:
                            worst, worst_at = err, f"{at}[{j}]: gpu {a!r}, executor {e!r}"
                        if err > 1e-4:
                            bad += 1
                            if bad <= 2 and failures < 5:
                                print(f"MISMATCH {at}[{j}]: gpu {a!r}, executor {e!r}")
                    failures += bad > 0
                elif g != w:
                    j = next(j for j in range(len(w)) if g[j] != w[j])
                    print(f"MISMATCH {at}[{j}]: gpu {g[j]!r}, executor {w[j]!r}")
                    failures += 1
            check(cuda.cuMemFree_v2(p), "cuMemFree")
        cuda.cuMemFree_v2(table)
        cuda.cuMemFree_v2(sizes)
    print(f"{name}: {failures} failing buffers; worst f32 relative difference {worst:.3e} ({worst_at})")
    return failures


def main():
    d, sets = sys.argv[1], sys.argv[2:]
    check(cuda.cuInit(0), "cuInit")
    dev = ctypes.c_int()
    check(cuda.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
    name = ctypes.create_string_buffer(256)
    cuda.cuDeviceGetName(name, 256, dev)
    print("device:", name.value.decode())
    ctx = ctypes.c_void_p()
    check(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    check(cuda.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    failures = sum(run_set(d, s) for s in sets)
    print("FAILED" if failures else "ALL OK")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

"""Compares a run's outputs with reference outputs, tensor by tensor.

    compare.py REF.safetensors OUT.safetensors [--tol 1e-3] [--label NAME]

For every tensor of REF (outputs and `grad.<param>` gradients) OUT must have one of the
same shape whose relative L2 error ||out - ref|| / ||ref|| is below the tolerance (an
all-zero reference is compared absolutely). Prints one line per tensor and a summary;
exit status 1 when any tensor is missing, misshapen, non-finite or too far off.
Standard library only (the GPU machine may lack numpy's safetensors support).
"""

import math
import sys

import st


def rel_l2(ref, out):
    num = 0.0
    den = 0.0
    for r, o in zip(ref, out):
        d = o - r
        num += d * d
        den += r * r
    if den == 0.0:
        return math.sqrt(num)
    return math.sqrt(num / den)


def main(argv):
    args = argv[1:]
    tol = 1e-3
    label = None
    if "--tol" in args:
        i = args.index("--tol")
        tol = float(args[i + 1])
        del args[i : i + 2]
    if "--label" in args:
        i = args.index("--label")
        label = args[i + 1]
        del args[i : i + 2]
    if len(args) != 2:
        sys.exit(__doc__)
    ref = st.read(args[0])
    out = st.read(args[1])
    failures = 0
    worst = 0.0
    prefix = "%s: " % label if label else ""
    for name in sorted(ref):
        r = ref[name]
        o = out.get(name)
        if o is None:
            print("%sFAIL %-40s missing from %s" % (prefix, name, args[1]))
            failures += 1
            continue
        if list(o.shape) != list(r.shape):
            print("%sFAIL %-40s shape %s, reference %s" % (prefix, name, o.shape, r.shape))
            failures += 1
            continue
        ov = [float(x) for x in o.values]
        if not all(math.isfinite(x) for x in ov):
            bad = sum(1 for x in ov if not math.isfinite(x))
            print("%sFAIL %-40s %d of %d values are not finite" % (prefix, name, bad, len(ov)))
            failures += 1
            continue
        e = rel_l2([float(x) for x in r.values], ov)
        worst = max(worst, e)
        ok = e < tol
        failures += 0 if ok else 1
        print("%s%s %-40s rel L2 %.3e  %s" % (prefix, "ok  " if ok else "FAIL", name, e, list(r.shape)))
    extra = sorted(set(out) - set(ref))
    if extra:
        print("%s(not in the reference: %s)" % (prefix, ", ".join(extra)))
    print(
        "%s%d tensors, %d failed, worst rel L2 %.3e (tolerance %.0e)"
        % (prefix, len(ref), failures, worst, tol)
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

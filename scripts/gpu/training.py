"""Reads `tnc-train` logs for the GPU check.

    training.py accuracy LOG MIN          the last evaluation's accuracy; exit 1 below MIN
    training.py compare GPU_LOG CPU_LOG STEPS TOL
                                          the first STEPS losses agree within TOL (abs.)
    training.py step LOG LABEL B N        median step time and tokens/s (the first step,
                                          which captures graphs and checks, left out) and
                                          the memory allocated, as a JSON line
"""

import json
import re
import statistics
import sys


def lines(path):
    with open(path) as f:
        return f.read().splitlines()


def losses(path):
    out = []
    for l in lines(path):
        m = re.match(r"step (\d+) loss (\S+) .* tokens/s (\S+)", l)
        if m:
            out.append((int(m.group(1)), float(m.group(2)), float(m.group(3))))
    return out


def main(argv):
    what = argv[1]
    if what == "accuracy":
        accs = [float(m.group(1)) for l in lines(argv[2]) for m in [re.search(r"accuracy (\S+)", l)] if m]
        if not accs:
            print("FAIL copy task: no evaluation in %s" % argv[2])
            return 1
        ok = accs[-1] >= float(argv[3])
        print("%s copy task: accuracy %.4f after %d steps (threshold %s)" % ("ok  " if ok else "FAIL", accs[-1], losses(argv[2])[-1][0], argv[3]))
        return 0 if ok else 1
    if what == "compare":
        gpu, cpu = losses(argv[2]), losses(argv[3])
        steps, tol = int(argv[4]), float(argv[5])
        if len(gpu) < steps or len(cpu) < steps:
            print("FAIL loss curves: %d GPU and %d CPU steps, %d wanted" % (len(gpu), len(cpu), steps))
            return 1
        diffs = [abs(g[1] - c[1]) for g, c in zip(gpu[:steps], cpu[:steps])]
        worst = max(range(steps), key=lambda i: diffs[i])
        ok = diffs[worst] <= tol
        print("%s T1-small: first %d losses within %.2e of the CPU run's (worst step %d: %.6f vs %.6f; tolerance %.0e)"
              % ("ok  " if ok else "FAIL", steps, diffs[worst], worst + 1, gpu[worst][1], cpu[worst][1], tol))
        return 0 if ok else 1
    if what == "step":
        path, label, b, n = argv[2], argv[3], int(argv[4]), int(argv[5])
        steps = losses(path)[1:]
        rec = {"impl": "tnc", "kind": "training step", "model": "transnormer_t1", "sizes": {"B": b, "N": n}, "label": label}
        if not steps:
            rec["error"] = "no steps (see %s)" % path
        else:
            tps = statistics.median(s[2] for s in steps)
            rec.update({"tokens_per_s": tps, "step_ms": 1e3 * b * n / tps, "steps": len(steps)})
        for l in lines(path):
            m = re.match(r"allocated (\d+) bytes", l)
            if m:
                rec["allocated_bytes"] = int(m.group(1))
        print(json.dumps(rec))
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))

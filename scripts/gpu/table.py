"""Prints the timing table from JSON lines (tnc-run bench's `BENCH_JSON {...}` lines
and peers.py's lines), read from the files given (or stdin).

    table.py results.jsonl ...
"""

import json
import sys


def rows(lines):
    for line in lines:
        line = line.strip()
        if line.startswith("BENCH_JSON "):
            line = line[len("BENCH_JSON ") :]
        if not line.startswith("{"):
            continue
        try:
            yield json.loads(line)
        except ValueError:
            continue


def fmt(v):
    return "%10.3f" % v if isinstance(v, (int, float)) else "%10s" % ("-" if v is None else v)


def main(argv):
    lines = []
    for path in argv[1:] or ["-"]:
        lines += (sys.stdin if path == "-" else open(path)).read().splitlines()
    recs = list(rows(lines))
    steps = [r for r in recs if r.get("kind") == "training step"]
    recs = [r for r in recs if r.get("kind") != "training step"]
    if steps:
        print("%-26s %3s %6s  %-12s %10s %12s %12s  %s" % ("training step", "B", "N", "launches", "step ms", "tokens/s", "alloc. GiB", "note"))
        print("-" * 108)
        for r in steps:
            s = r.get("sizes", {})
            alloc = r.get("allocated_bytes")
            print(
                "%-26s %3s %6s  %-12s %s %s %s  %s"
                % (
                    r.get("model", "?"),
                    s.get("B", "?"),
                    s.get("N", "?"),
                    r.get("label", "?"),
                    fmt(r.get("step_ms")),
                    "%12.0f" % r["tokens_per_s"] if "tokens_per_s" in r else "%12s" % "-",
                    "%12.2f" % (alloc / 2**30) if alloc else "%12s" % "-",
                    r.get("error", ""),
                )
            )
        print()
    recs.sort(key=lambda r: (r.get("model", ""), r.get("sizes", {}).get("N", 0), r.get("impl", ""), r.get("dtype", "")))
    print("%-26s %3s %6s  %-22s %-5s %10s %10s  %s" % ("model", "B", "N", "implementation", "dtype", "fwd ms", "fwd+bwd ms", "note"))
    print("-" * 108)
    for r in recs:
        s = r.get("sizes", {})
        print(
            "%-26s %3s %6s  %-22s %-5s %s %s  %s"
            % (
                r.get("model", "?"),
                s.get("B", "?"),
                s.get("N", "?"),
                r.get("impl", "?"),
                r.get("dtype", "?"),
                fmt(r.get("forward_ms")),
                fmt(r.get("fwd_bwd_ms")),
                r.get("error", ""),
            )
        )


if __name__ == "__main__":
    main(sys.argv)

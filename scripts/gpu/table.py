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
    recs.sort(key=lambda r: (r.get("model", ""), r.get("sizes", {}).get("N", 0), r.get("impl", ""), r.get("dtype", "")))
    print("%-18s %3s %6s  %-22s %-5s %10s %10s  %s" % ("model", "B", "N", "implementation", "dtype", "fwd ms", "fwd+bwd ms", "note"))
    print("-" * 100)
    for r in recs:
        s = r.get("sizes", {})
        print(
            "%-18s %3s %6s  %-22s %-5s %s %s  %s"
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

"""Writes deterministic model inputs as safetensors.

    make_inputs.py OUT SEED NAME:DTYPE:SHAPE:KIND ...

SHAPE is `2x37`; DTYPE f32 or i32; KIND `normal` (standard normal, f32), `uniform`
(in [-1, 1), f32) or `int<V` (integers in 0..V, i32).
"""

import random
import sys

import st


def main(argv):
    if len(argv) < 4:
        sys.exit(__doc__)
    out, seed = argv[1], int(argv[2])
    tensors = {}
    for spec in argv[3:]:
        name, dtype, shape, kind = spec.split(":")
        shape = [int(d) for d in shape.split("x")]
        rng = random.Random("%d/%s" % (seed, name))
        n = 1
        for d in shape:
            n *= d
        if kind == "normal":
            vals = [rng.gauss(0.0, 1.0) for _ in range(n)]
        elif kind == "uniform":
            vals = [rng.uniform(-1.0, 1.0) for _ in range(n)]
        elif kind.startswith("int<"):
            v = int(kind[4:])
            vals = [rng.randrange(v) for _ in range(n)]
        else:
            sys.exit("unknown kind %r in %r" % (kind, spec))
        tensors[name] = st.Tensor({"f32": "F32", "i32": "I32"}[dtype], shape, vals)
    st.write(out, tensors)


if __name__ == "__main__":
    main(sys.argv)

"""Minimal safetensors reading and writing with the standard library only.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each
tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets into the data
that follows the header; an optional "__metadata__" entry), then the raw little-endian
bytes. The GPU machine may lack the `safetensors` package, so the check scripts use this.
"""

import array
import json
import struct
import sys

# safetensors dtype -> (array typecode, bytes per element); BF16/F16 are widened on read.
_CODES = {"F64": ("d", 8), "F32": ("f", 4), "I64": ("q", 8), "I32": ("i", 4), "U8": ("B", 1), "BOOL": ("B", 1)}


class Tensor:
    def __init__(self, dtype, shape, values):
        self.dtype = dtype  # safetensors name of the stored type
        self.shape = list(shape)
        self.values = values  # array.array (floats widened to Python floats when read)

    def numel(self):
        n = 1
        for d in self.shape:
            n *= d
        return n


def _to_array(dtype, raw):
    if dtype in _CODES:
        code, _ = _CODES[dtype]
        a = array.array(code)
        a.frombytes(raw)
        if sys.byteorder != "little":
            a.byteswap()
        return a
    if dtype in ("BF16", "F16"):
        half = array.array("H")
        half.frombytes(raw)
        if sys.byteorder != "little":
            half.byteswap()
        if dtype == "BF16":
            out = array.array("f")
            out.frombytes(b"".join(struct.pack("<I", h << 16) for h in half))
            return out
        return array.array("f", (struct.unpack("<e", struct.pack("<H", h))[0] for h in half))
    raise ValueError("unsupported safetensors dtype %s" % dtype)


def read(path):
    """{name: Tensor} of every tensor in the file."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        out[name] = Tensor(info["dtype"], info["shape"], _to_array(info["dtype"], data[base + b : base + e]))
    return out


def write(path, tensors):
    """Writes {name: Tensor} (values: an array.array of the dtype's typecode)."""
    header = {}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        code, size = _CODES[t.dtype]
        a = t.values if isinstance(t.values, array.array) and t.values.typecode == code else array.array(code, t.values)
        if len(a) != t.numel():
            raise ValueError("tensor %s: %d values for shape %s" % (name, len(a), t.shape))
        if sys.byteorder != "little":
            a = array.array(code, a)
            a.byteswap()
        raw = a.tobytes()
        header[name] = {"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for raw in blobs:
            f.write(raw)

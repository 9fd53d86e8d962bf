#!/usr/bin/env python3
"""Simulates a new sensor for the digits data: a 3x3 box blur, lower contrast and a black-level
offset (x -> 0.25 + 0.5 * blur(x)), written as new .npy files. Standard library only.

usage: digits-shift.py IN.npy OUT.npy [FIRST COUNT]   (optionally only samples FIRST..FIRST+COUNT)
"""
import ast, struct, sys

def read(path):
    b = open(path, "rb").read()
    n = int.from_bytes(b[8:10], "little")
    h = ast.literal_eval(b[10:10 + n].decode())
    assert h["descr"] == "<f4" and not h["fortran_order"]
    return h["shape"], struct.unpack("<%df" % (len(b[10 + n:]) // 4), b[10 + n:])

def write(path, shape, vals):
    h = repr({"descr": "<f4", "fortran_order": False, "shape": tuple(shape)}).encode()
    h += b" " * (63 - (10 + len(h)) % 64) + b"\n"
    open(path, "wb").write(b"\x93NUMPY\x01\x00" + len(h).to_bytes(2, "little") + h + struct.pack("<%df" % len(vals), *vals))

shape, x = read(sys.argv[1])
first, count = (int(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 4 else (0, shape[0])
out = []
for s in range(first, first + count):
    img = x[s * 64:(s + 1) * 64]
    for r in range(8):
        for c in range(8):
            nb = [img[rr * 8 + cc] for rr in range(r - 1, r + 2) for cc in range(c - 1, c + 2) if 0 <= rr < 8 and 0 <= cc < 8]
            out.append(0.25 + 0.5 * sum(nb) / len(nb))
write(sys.argv[2], [count] + list(shape[1:]), out)

#!/usr/bin/env python3
"""Writes data/digits/digits.bin from scikit-learn's copy of the UCI digits.

    python3 -m pip download --no-deps scikit-learn -d /tmp/skl
    python3 scripts/vendor_digits.py /tmp/skl/scikit_learn-*.whl

Each of the 1797 records is 65 bytes: 64 pixels (row-major 8x8, values 0..16), then the label.
"""
import gzip
import io
import os
import sys
import zipfile

wheel = sys.argv[1]
with zipfile.ZipFile(wheel) as z:
    raw = gzip.decompress(z.read("sklearn/datasets/data/digits.csv.gz")).decode()
out = bytearray()
for line in raw.strip().splitlines():
    values = [int(float(v)) for v in line.split(",")]
    assert len(values) == 65 and all(0 <= v <= 16 for v in values[:64]) and 0 <= values[64] <= 9
    out.extend(values)
target = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "digits", "digits.bin")
with open(target, "wb") as f:
    f.write(out)
print(f"wrote {len(out) // 65} records to {target}")

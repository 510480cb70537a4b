"""Random ggml blocks and gguf-py's numpy dequantization of them, for tests/test_ggml_quants.cpp.

usage: gguf_quants.py TYPE SEED BLOCKS OUT

Writes OUT.blocks (raw blocks) and OUT.f32 (gguf.quants.dequantize of them, float32). The blocks are,
in order: BLOCKS with random quant bytes and finite f16 scale fields (zeros, subnormals, the largest
halves and random finite values, of both signs); BLOCKS of random bytes throughout, with a quarter of
the scale fields set to an infinity or a NaN; and, for the types gguf-py can quantize, BLOCKS
quantized from random floats.
"""
import sys

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quantize

# Byte offsets of the f16 scale fields (d, m, dmin) in each block type.
SCALE_FIELDS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}
QUANTIZABLE = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}

# +-0, the smallest and largest subnormals, 1, the largest finite half.
SPECIAL_HALVES = [0x0000, 0x0001, 0x03FF, 0x3C00, 0x7BFF]
# +-inf, a quiet and a signalling NaN.
NONFINITE_HALVES = [0x7C00, 0x7E00, 0x7C01]


def set_halves(blocks, rng, offset, special, fraction, finite):
    """Random halves (finite ones only when `finite`) at `offset`, a fraction of them from `special`."""
    count = blocks.shape[0]
    bits = blocks[:, offset:offset + 2].copy().view("<u2").reshape(count)
    if finite:
        bits = np.where((bits & 0x7C00) == 0x7C00, bits & 0x83FF, bits)  # inf/NaN exponent -> subnormal
    chosen = rng.choice(special, size=count).astype(np.uint16) | (bits & 0x8000)
    bits = np.where(rng.random(count) < fraction, chosen, bits).astype("<u2")
    blocks[:, offset:offset + 2] = bits.view(np.uint8).reshape(count, 2)


def main():
    name, seed, count, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    qtype = GGMLQuantizationType[name]
    block_values, block_bytes = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)

    finite, nonfinite = rng.integers(0, 256, size=(2, count, block_bytes), dtype=np.uint8)
    for offset in SCALE_FIELDS[name]:
        set_halves(finite, rng, offset, SPECIAL_HALVES, 0.3, finite=True)
        set_halves(nonfinite, rng, offset, NONFINITE_HALVES, 0.25, finite=False)
    parts = [finite, nonfinite]
    if name in QUANTIZABLE:
        # Gaussian blocks at magnitudes from 1e-6 to 1e4, one block of zeros.
        data = rng.standard_normal((count, block_values)) * 10.0 ** rng.uniform(-6, 4, size=(count, 1))
        data[0] = 0
        parts.append(quantize(data.astype(np.float32), qtype).reshape(count, block_bytes))
    blocks = np.concatenate(parts)

    with np.errstate(all="ignore"):  # inf * 0 and the like in the random blocks
        values = dequantize(blocks, qtype)
    blocks.tofile(out + ".blocks")
    values.astype("<f4").tofile(out + ".f32")


if __name__ == "__main__":
    main()

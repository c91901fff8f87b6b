"""Whether dgemma compiles its kernels with torch.compile (Inductor) in this process.

The sampler's fused digest for large vocabularies, the AMX int4 kernel and the one-pass dequantisation of large Q8_0
tiles are compiled; each has an eager version that computes the same thing (the AMX kernel's is torch's eager int4
kernel, in its own layout). `DGEMMA_COMPILE=0` keeps every kernel eager: for a machine without a C++ compiler, or to
time the eager paths.
"""

from __future__ import annotations

import os


def compiling_allowed() -> bool:
    """False when DGEMMA_COMPILE=0."""
    return os.environ.get("DGEMMA_COMPILE", "1") != "0"

"""Whether dgemma compiles its kernels with torch.compile (Inductor) in this process.

The sampler's fused digest for large vocabularies and the AMX int4 kernel are compiled; each has an eager version
that computes the same thing. `DGEMMA_COMPILE=0` keeps every kernel
eager: for a machine without a C++ compiler, or to time the eager paths.
"""

from __future__ import annotations

import os


def compiling_allowed() -> bool:
    return os.environ.get("DGEMMA_COMPILE", "1") != "0"

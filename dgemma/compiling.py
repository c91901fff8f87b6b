"""Whether dgemma compiles its kernels with torch.compile (Inductor) in this process.

The sampler's fused digest for large vocabularies, the AMX int4 kernel, the one-pass dequantisation of large tiles of
one-byte codes, the product of a few rows with such a matrix and a lone token's products with large bf16 or fp16
matrices (`dgemma.one_row`) are compiled; each has an eager version that computes the same thing (the AMX kernel's is
torch's eager int4 kernel, in its own layout; the few-row product's, dequantised tiles, which round the weights to
the model dtype where it rounds only its result; the one-row products', F.linear and the grouped experts).
`DGEMMA_COMPILE=0` keeps every kernel eager: for a machine without a C++ compiler, or to time the eager paths.
The 4-bit kernels built here (the AMX template, dgemma's AVX-512 kernel) are used only where they agree with torch's
eager int4 kernel on a small weight in this process (`agrees_with_torch_int4`). dgemma's own C++ kernels
(dgemma/kernels/) are built with the machine's compiler at first use (`built_library`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import types
from pathlib import Path
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)


# Inductor sums a float32 reduction longer than 4,096 values with a cascade helper (for accuracy), which read a
# 2,816 x 8,192 matrix (the released model's full layers' o_proj) from memory at 27 GB/s against 40 GB/s for plain
# loops (bf16), and its Q8_0 codes at 12 against 33 G codes/s, on a 2-core AMD EPYC (Zen 5): the compiled products
# of a few rows (`dgemma.one_row`, the quantised few-row product) sum a longer row in chunks of SUM_CHUNK, each a
# plain loop, and add the chunks' float32 sums.
SUM_CHUNK = 4096


def compiling_allowed() -> bool:
    """False when DGEMMA_COMPILE=0."""
    return os.environ.get("DGEMMA_COMPILE", "1") != "0"


def compiled_under_own_name(function: Callable, name: str, **options: Any) -> Callable:
    """torch.compile of `function` behind a code object of its own, named `name`: dynamo counts recompiles (and
    caches graphs) per code object, so kernels compiled this way for different weight shapes or types never use up
    each other's recompile limit."""
    code = function.__code__.replace(co_name=name)
    return torch.compile(types.FunctionType(code, function.__globals__, name), **options)


def agrees_with_torch_int4(pack: Callable[[torch.Tensor], torch.Tensor], matmul: Callable[..., torch.Tensor],
                           n: int, k: int, counts: tuple[int, ...]) -> bool:
    """Whether a 4-bit kernel (`matmul(rows, pack(codes), scales_and_zeros)`, value = (code - 8) * scale + zero per
    group of 32) agrees with torch's eager int4 kernel on a random weight [n, k], for each number of rows in
    `counts`, to bf16 rounding: both round once from fp32 sums in different orders. A kernel that raises (no C++
    compiler, an Inductor that lowers the op differently) does not agree."""
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (n, k), generator=generator, dtype=torch.int32)
    scales_and_zeros = (torch.rand(k // 32, n, 2, generator=generator) - 0.5).to(torch.bfloat16)
    packed, ours = torch._convert_weight_to_int4pack_for_cpu(codes, 1), pack(codes)
    for count in counts:
        rows = torch.randn(count, k, generator=generator).to(torch.bfloat16)
        try:
            expected = torch._weight_int4pack_mm_for_cpu(rows, packed, 32, scales_and_zeros).float()
            got = matmul(rows, ours, scales_and_zeros).float()
        except Exception:
            return False
        if not ((got - expected).abs() <= 2**-7 * expected.abs().amax() + 1e-3).all():
            return False
    return True


PAIR_BLOCK = 32  # output columns whose scale and zero pairs dgemma's int4 kernels read together


def block_pairs(scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """bf16 scales and zeros in torch's int4 layout, [..., K // 32, N, 2], as dgemma's AVX-512 and AVX2 int4 kernels
    read them: [..., N // 32, K // 32, 32, 2], each block of 32 output columns' pairs together, group after group, so
    that a block's pairs are one stream beside its codes (in torch's layout a group's pairs lie N x 4 bytes apart)."""
    *lead, groups, n, _ = scales_and_zeros.shape
    if n % PAIR_BLOCK:
        raise ValueError(f"the int4 kernels' blocked pairs need rows in multiples of {PAIR_BLOCK}, got scales and "
                         f"zeros for {n}")
    return scales_and_zeros.reshape(*lead, groups, n // PAIR_BLOCK, PAIR_BLOCK, 2).transpose(-4, -3).contiguous()


# How dgemma's C++ kernels (dgemma/kernels/*.cpp) are compiled: the AVX-512 ones with AVX-512 BF16 instructions, the
# AVX2 one with AVX2, FMA and F16C (every AVX2 CPU has them); torch's OpenMP.
AVX512_FLAGS = ("-O3", "-std=c++17", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-fopenmp",
                "-shared", "-fPIC", "-w")
AVX2_FLAGS = ("-O3", "-std=c++17", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-w")


@functools.cache
def load_library(source: Path, flags: tuple[str, ...]) -> None:
    """Build (if needed) and load a C++ kernel's library once per process, registering its ops; raises as
    `built_library` does, or OSError when the library does not load."""
    torch.ops.load_library(str(built_library(source, flags)))


def library_loads(source: Path, flags: tuple[str, ...], instead: str) -> bool:
    """Whether `load_library` works here; where it does not (no compiler, an unwritable cache, a failed build), a
    warning says why and what runs `instead`."""
    try:
        load_library(source, flags)
    except (OSError, RuntimeError) as error:
        logger.warning("%s here, slower: dgemma's kernel %s is unavailable (%s)", instead, source.name, error)
        return False
    return True


def built_library(source: Path, flags: tuple[str, ...]) -> Path:
    """The shared library of a C++ kernel source built against the installed torch with the machine's compiler ($CXX,
    else c++), cached under $XDG_CACHE_HOME/dgemma/kernels by source, torch version, compiler and flags; built if it
    is not there (atomically: concurrent builds each write their own file and rename it into place). Raises
    RuntimeError naming the source when there is no compiler or the build fails."""
    torch_dir = Path(torch.__file__).parent
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    compiler = os.environ.get("CXX", "c++")
    key = hashlib.sha256("\0".join([source.read_text(), torch.__version__, compiler, abi, *flags]).encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dgemma" / "kernels"
    library = cache / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r}) to build {source.name}")
    cache.mkdir(parents=True, exist_ok=True)
    logger.info("building %s with %s, once (cached in %s)", source.name, compiler, cache)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        built = Path(scratch) / library.name
        command = [compiler, *flags, abi, f"-I{torch_dir / 'include'}",
                   f"-I{torch_dir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}", str(source), "-o", str(built),
                   f"-L{torch_dir / 'lib'}", f"-Wl,-rpath,{torch_dir / 'lib'}", "-ltorch_cpu", "-lc10"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"building {source.name} failed:\n{result.stderr[-2000:]}")
        os.replace(built, library)
    return library

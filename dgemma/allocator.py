"""Process-wide memory allocator settings for generation on CPU.

A denoising step allocates and frees tensors of megabytes (the logits of the canvas, their weights, the MoE
buffers) dozens of times. glibc serves every block above its mmap threshold with a fresh `mmap` and unmaps it on
free, so each step pays page faults and page zeroing for memory it has just given back. Serving large blocks from
the heap and never trimming it removes that cost; for the fast sampler it also lowers peak RSS, since blocks are
reused rather than mapped anew (docs/performance.md has the measurements, for the reference too, whose peak RSS
rises instead). The CLI applies this for the processes it owns (generate, chat, serve, bench, train); library
users call `tune_allocator()` themselves or set glibc's MALLOC_* variables; `dgemma bench` applies it to every
system only with --tune-allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

import torch

log = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 2**31 - 1  # the largest an int holds: the heap top is kept unless 2 GiB are free

_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                  "GLIBC_TUNABLES")


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None
    # other C libraries' mallopt takes other parameter numbers, and they have no malloc_trim
    return libc if hasattr(libc, "gnu_get_libc_version") else None


def release_free_memory() -> None:
    """Give the memory glibc holds free back to the system (`malloc_trim`): after a load whose temporaries (codes
    decoded and repacked) a tuned allocator would otherwise keep. A no-op with other C libraries."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        libc.malloc_trim(0)


# madvise's advice (Linux, <sys/mman.h>): reclaim these pages, keeping their data (Linux 5.4 and later).
_MADV_PAGEOUT = 21


def page_out(tensor: torch.Tensor) -> bool:
    """Ask the kernel to reclaim the pages of a CPU tensor that will not be read again (`madvise(MADV_PAGEOUT)`): a
    weight that views a checkpoint's file mapping and has been replaced by a copy leaves the resident set instead of
    staying there, read once, until memory runs short. The data are kept (a file's pages are read again if touched;
    anonymous memory without swap stays), so the advice is safe on any tensor. Returns whether the kernel took it:
    not off Linux or glibc, on kernels before 5.4, or for a tensor within one page."""
    libc = _glibc()
    if libc is None or tensor.device.type != "cpu":
        return False
    page = os.sysconf("SC_PAGE_SIZE")
    start = tensor.data_ptr()
    first, last = -(-start // page) * page, (start + tensor.numel() * tensor.element_size()) // page * page
    if last <= first:
        return False
    libc.madvise.argtypes, libc.madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return libc.madvise(first, last - first, _MADV_PAGEOUT) == 0


def tune_allocator() -> bool:
    """Serve large blocks from the heap and keep freed memory there instead of unmapping it. Returns whether the settings were applied: not
    when the C library is not glibc, when the user set glibc's allocator variables (theirs win), or when
    DGEMMA_TUNE_MALLOC=0."""
    if os.environ.get("DGEMMA_TUNE_MALLOC", "1") == "0" or any(name in os.environ for name in _USER_SETTINGS):
        return False
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # no block from mmap (thread arenas still grow their heaps by mmap), and the main heap's top kept
    applied = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    log.info("allocator: no mmap for large blocks, no trimming (%s)", "applied" if applied else "refused")
    return applied

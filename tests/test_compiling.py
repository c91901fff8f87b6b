"""dgemma.compiling's C++ kernel builds, on any CPU: a machine that cannot build a kernel is told why, nothing is left
in the cache, and the kernel's module falls back with a warning naming what runs instead."""

from __future__ import annotations

import logging
import shutil

import pytest

from dgemma import avx2_rows, avx512_int4, fused_ops, one_query_attention
from dgemma.compiling import AVX2_FLAGS, AVX512_FLAGS, built_library, library_loads

KERNELS = [(avx512_int4.SOURCE, AVX512_FLAGS), (one_query_attention.SOURCE, AVX512_FLAGS),
           (one_query_attention.SOURCE, AVX2_FLAGS), (avx2_rows.SOURCE, AVX2_FLAGS),
           (fused_ops.SOURCE, AVX2_FLAGS)]


@pytest.mark.parametrize("source, flags", KERNELS, ids=lambda kernel: getattr(kernel, "stem", ""))
def test_a_machine_that_cannot_build_a_kernel_is_told_why(source, flags, tmp_path, monkeypatch) -> None:
    """No compiler, or a build that fails: the reason, and nothing left in the cache (the process's own cache and
    any loaded kernel are untouched: the build is retried into an empty cache here)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(RuntimeError, match=f"no C.. compiler .'no-such-compiler'. to build {source.name}"):
        built_library(source, flags)
    monkeypatch.setenv("CXX", "false")  # a compiler that fails
    with pytest.raises(RuntimeError, match=f"building {source.name} failed"):
        built_library(source, flags)
    assert list((tmp_path / "dgemma" / "kernels").iterdir()) == []


def test_a_kernel_that_does_not_load_says_what_runs_instead(tmp_path, monkeypatch, caplog) -> None:
    source = tmp_path / "copy_of_avx2_rows.cpp"  # a source this process has not loaded (load_library caches)
    shutil.copy(avx2_rows.SOURCE, source)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", "no-such-compiler")
    with caplog.at_level(logging.WARNING, logger="dgemma.compiling"):
        assert not library_loads(source, AVX2_FLAGS, "the slow way runs")
    assert "the slow way runs here, slower: dgemma's kernel copy_of_avx2_rows.cpp is unavailable" in caplog.text
    assert "no C++ compiler" in caplog.text

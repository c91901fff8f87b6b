"""The allocator settings the CLI applies: taken on glibc, and the user's own settings always win."""

import platform

import pytest

from dgemma.allocator import tune_allocator


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings exist on glibc only")
def test_tune_allocator_applies_on_glibc(monkeypatch):
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES",
                 "DGEMMA_TUNE_MALLOC"):
        monkeypatch.delenv(name, raising=False)
    assert tune_allocator() is True


@pytest.mark.parametrize("name, value", [("DGEMMA_TUNE_MALLOC", "0"), ("MALLOC_TOP_PAD_", "65536"),
                                         ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")])
def test_tune_allocator_leaves_user_settings_alone(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert tune_allocator() is False

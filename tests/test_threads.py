"""The dgemma command's thread policy (dgemma/threads.py): the user's settings win, otherwise one thread per idle
core and short OpenMP spinning. How much it matters is measured by scripts/threads_under_load.py, not here."""

from __future__ import annotations

import subprocess
import sys

from dgemma import threads


def test_the_users_settings_win(monkeypatch):
    monkeypatch.delenv("DGEMMA_THREAD_POLICY", raising=False)
    assert threads.choose_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.choose_threads(None) is None  # torch takes OMP_NUM_THREADS itself
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("DGEMMA_THREAD_POLICY", "off")
    assert threads.choose_threads(None) is None
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    threads.configure_waiting()
    assert "GOMP_SPINCOUNT" not in threads.os.environ


def test_idle_cores_set_the_default_and_waiting_spins_briefly(monkeypatch):
    for name in ("DGEMMA_THREAD_POLICY", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    monkeypatch.setattr(threads, "busy_cores", lambda: 1)
    assert threads.choose_threads(None) == 3
    monkeypatch.setattr(threads, "busy_cores", lambda: 7)
    assert threads.choose_threads(None) == 1
    threads.configure_waiting()
    assert threads.os.environ["GOMP_SPINCOUNT"] == threads.SPIN_COUNT
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    threads.configure_waiting()
    assert "GOMP_SPINCOUNT" not in threads.os.environ


def test_busy_cores_reads_the_kernels_runnable_count():
    assert 0 <= threads.busy_cores() < 1000


def test_the_command_sets_waiting_before_torch_starts():
    """GOMP_SPINCOUNT only works if it is in the environment when torch loads libgomp: the command sets it at
    import, before torch."""
    code = ("import os, sys\n"
            "os.environ.pop('GOMP_SPINCOUNT', None); os.environ.pop('OMP_WAIT_POLICY', None)\n"
            "import dgemma.threads as policy\n"
            "configure, torch_loaded = policy.configure_waiting, []\n"
            "policy.configure_waiting = lambda: torch_loaded.append('torch' in sys.modules) or configure()\n"
            "import dgemma.cli\n"
            "print(os.environ.get('GOMP_SPINCOUNT'), torch_loaded)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == [threads.SPIN_COUNT, "[False]"], result.stderr[-2000:]

"""gravprobe.common.set_cpu_allocator: freed CPU tensor memory stays in glibc's heap (no page faults per step)."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from gravprobe.common import set_cpu_allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# a training step in miniature: activations written, then freed; the faults of the median step. One is 40 MB,
# above glibc's largest dynamic mmap threshold (32 MiB), so glibc's defaults map it afresh every step.
_STEP = textwrap.dedent("""
    import resource, sys, torch
    from gravprobe.common import set_cpu_allocator
    print(set_cpu_allocator(sys.argv[1]))
    def step():
        xs = [torch.ones(2_000_000) for _ in range(3)] + [torch.ones(10_000_000)]
        del xs
    for _ in range(3):
        step()
    faults = []
    for _ in range(11):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    print(sorted(faults)[5])     # the median step (the heap may still grow once, by its top pad)
""")


def _faults(mode: str, env: dict | None = None) -> tuple[str, float]:
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    run_env.update(env or {})
    out = subprocess.run([sys.executable, "-c", _STEP, mode], capture_output=True, text=True, check=True,
                         env=run_env).stdout.splitlines()
    return out[0], float(out[1])


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only")
def test_heap_mode_stops_the_per_step_page_faults_that_glibc_defaults_take():
    msg_sys, sys_faults = _faults("system")
    msg_heap, heap_faults = _faults("heap")
    assert "glibc defaults" in msg_sys and "stays in glibc's heap" in msg_heap
    # the 40 MB block alone is ~9,800 pages, faulted in again every step under glibc's defaults
    assert sys_faults > 5000, sys_faults
    assert heap_faults < 50, heap_faults


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only")
def test_a_users_own_malloc_settings_are_left_alone():
    msg, _ = _faults("heap", {"MALLOC_TRIM_THRESHOLD_": "131072"})
    assert msg.startswith("CPU allocator: left alone") and "MALLOC_TRIM_THRESHOLD_" in msg


def test_unknown_mode_names_the_choices():
    with pytest.raises(ValueError, match="heap .*system"):
        set_cpu_allocator("jemalloc")

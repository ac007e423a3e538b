"""The builds of the native CPU kernels by instruction set (`cpu_native.ISAS`): the best one
the CPU runs is loaded, THINFER_NATIVE_ISA picks another or is refused with a reason, and
the AVX2 build passes the kernel tests on a machine that loads the AVX-512 one (otherwise
only the loaded build would ever be tested here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from thinfer.kernels import cpu_native
from thinfer.kernels.cpu_panels import panels_available

pytestmark = pytest.mark.skipif(
    cpu_native.native_library() is None, reason="no native CPU kernels here"
)

KERNEL_TESTS = (
    "test_cpu_qgemm.py",
    "test_cpu_layer_ops.py",
    "test_cpu_attention.py",
    "test_native_stack.py",
)


def test_the_best_supported_build_is_loaded() -> None:
    supported = cpu_native.supported_isas()
    assert supported and supported[-1] == "avx2"
    wanted = os.environ.get("THINFER_NATIVE_ISA")
    assert cpu_native.native_isa() == (wanted or supported[0])
    assert panels_available() == (cpu_native.native_isa() == "avx512")
    assert hasattr(cpu_native.load_build("avx2"), "f32_linear")


def test_a_build_the_cpu_cannot_run_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THINFER_NATIVE_ISA", "avx2")
    library, reason, isa = cpu_native._load()
    assert library is not None and reason is None and isa == "avx2"
    monkeypatch.setenv("THINFER_NATIVE_ISA", "sse2")
    library, reason, isa = cpu_native._load()
    assert library is None and isa is None
    assert "THINFER_NATIVE_ISA=sse2" in str(reason)
    with pytest.raises(ValueError, match="unknown kernel build"):
        cpu_native.load_build("sse2")
    if "avx512" not in cpu_native.supported_isas():
        with pytest.raises(RuntimeError, match="cannot run the avx512 build"):
            cpu_native.load_build("avx512")


@pytest.mark.skipif(
    cpu_native.native_isa() != "avx512", reason="the AVX2 build is the one loaded here"
)
def test_the_avx2_build_passes_the_kernel_tests() -> None:
    here = Path(__file__).parent
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        + [str(here / name) for name in KERNEL_TESTS],
        env={**os.environ, "THINFER_NATIVE_ISA": "avx2"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout

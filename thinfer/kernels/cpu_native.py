"""Builds and loads the C kernels of `thinfer/kernels/cpu/`: the quantized matmuls
(`qgemm.c`), the fp32 GEMV (`fp32_gemv.c`), the small per-layer ops (`layer_ops.c`) and the
decode attention over the paged cache (`decode_attention.c`) of the CPU fast path, with the
vector helpers they share (`fp32_tiles.h`).

The sources are compiled once per machine with the system C compiler (`cc`, or `$CC`) into a
cache directory (`$THINFER_CACHE`, default `~/.cache/thinfer`) named after a hash of the
sources and flags, then loaded with ctypes; a later process only loads it. Compilation takes
about a second. The library is built with OpenMP and links `libgomp.so.1`, which torch's CPU
build has already loaded, so the kernels share torch's thread pool instead of starting a
second one.

The kernels need an x86-64 CPU with AVX2, FMA and F16C. Where that or a compiler is
missing, or `THINFER_NATIVE_KERNELS=0` is set, `native_library()` returns None and says
why in `native_unavailable_reason()`; callers then use torch's own kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

SOURCES = tuple(sorted((Path(__file__).parent / "cpu").glob("*.c")))
HEADERS = tuple(sorted((Path(__file__).parent / "cpu").glob("*.h")))
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=c11")
REQUIRED_CPU_FLAGS = ("avx2", "fma", "f16c")

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_reason: str | None = None
_loaded = False

_i64, _ptr, _f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
SIGNATURES = {
    "add_rms_norm": (_ptr, _ptr, _ptr, _i64, _i64, _f32, _ptr, _ptr),
    "rope": (_ptr, _i64, _i64, _ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr),
    "silu_mul": (_ptr, _i64, _i64, _ptr),
    "paged_decode_attention": (
        *(_ptr, _i64, _i64, _i64, _i64),  # q, seqs, q heads, kv heads, head dim
        *(_ptr, _ptr, _i64, _ptr, _i64),  # caches, block size, block tables and their width
        *(_ptr, _f32, _ptr),  # context lengths, scale, out
    ),
    "q16_quantize": (_ptr, _i64, _i64, _ptr, _ptr, _ptr),
    "q4_linear": (_ptr, _i64, _i64, _ptr, _ptr, _i64, _ptr, _ptr),
    "q8_linear": (_ptr, _i64, _i64, _ptr, _ptr, _i64, _ptr, _ptr),
    "f32_linear": (_ptr, _i64, _i64, _ptr, _i64, _ptr, _ptr),
    "q4_dequantize": (_ptr, _ptr, _i64, _i64, _ptr),
    "q8_dequantize": (_ptr, _ptr, _i64, _i64, _ptr),
}


def cache_dir() -> Path:
    """Where compiled kernels are kept."""
    root = os.environ.get("THINFER_CACHE") or Path.home() / ".cache" / "thinfer"
    return Path(root) / "kernels"


def _missing_cpu_flags() -> list[str]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return list(REQUIRED_CPU_FLAGS)
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return list(REQUIRED_CPU_FLAGS)  # no way to tell: do not risk illegal instructions
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")),
        [],
    )
    return [flag for flag in REQUIRED_CPU_FLAGS if flag not in flags]


def _compile(compiler: str) -> Path:
    """The compiled library's path, compiling it first if this source and these flags have
    not been compiled yet (written to a temporary name, then renamed: concurrent processes
    never load a half-written file)."""
    digest = hashlib.sha256(" ".join(FLAGS).encode() + compiler.encode())
    for source in SOURCES + HEADERS:
        digest.update(source.read_bytes())
    target = cache_dir() / f"thinfer-cpu-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        result = subprocess.run(
            [compiler, *FLAGS, *map(str, SOURCES), "-o", str(built), "-lm"],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed on the CPU kernels: {result.stderr.strip()}")
        os.replace(built, target)
    return target


def _load() -> tuple[ctypes.CDLL | None, str | None]:
    if os.environ.get("THINFER_NATIVE_KERNELS", "1") == "0":
        return None, "disabled by THINFER_NATIVE_KERNELS=0"
    missing = _missing_cpu_flags()
    if missing:
        return None, f"the CPU lacks {', '.join(missing)} (or is not x86-64)"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler (cc or gcc) on PATH"
    try:
        library = ctypes.CDLL(str(_compile(compiler)))
    except (OSError, RuntimeError) as error:
        return None, str(error)
    for name, argtypes in SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes = argtypes
        function.restype = None
    return library, None


def native_library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None where it cannot run (see the module docstring)."""
    global _library, _reason, _loaded
    if _loaded:  # the per-call path of every kernel: no lock once loaded
        return _library
    with _lock:
        if not _loaded:
            _library, _reason = _load()
            _loaded = True
    return _library


def native_unavailable_reason() -> str | None:
    """Why `native_library()` is None (None when it loaded)."""
    native_library()
    return _reason

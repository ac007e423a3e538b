"""Builds and loads the C kernels of `thinfer/kernels/cpu/`: the quantized matmuls
(`qgemm.c`, and `panel_products.c` in the AVX-512 build), the fp32 GEMV (`fp32_gemv.c`), the
small per-layer ops (`layer_ops.c`), the decode attention over the paged cache
(`decode_attention.c`) and the whole decode step that chains them (`decoder_stack.c`) of the
CPU fast path, with the helpers they share (`fp32_tiles.h`, `vector_exp.h`) and their
prototypes (`kernels.h`).

The sources are compiled once per machine with the system C compiler (`cc`, or `$CC`) into a
cache directory (`$THINFER_CACHE`, default `~/.cache/thinfer`) named after a hash of the
sources and flags, then loaded with ctypes; a later process only loads it. Compilation takes
about a second. The library is built with OpenMP and links `libgomp.so.1`, which torch's CPU
build has already loaded, so the kernels share torch's thread pool instead of starting a
second one.

The kernels need an x86-64 CPU with AVX2, FMA and F16C. On a CPU that also has AVX-512
(F, BW, DQ, VL) the same sources are built a second time with it (`ISAS`: the fp32 tiles of
`fp32_tiles.h` then use 16-lane vectors, twice the multiply-adds per instruction; measured on
a 2-core Zen 5 EPYC: the batch-16 products ~2x faster) and that build is loaded;
`THINFER_NATIVE_ISA=avx2` keeps the AVX2 build. Where the CPU, a compiler or the build is
missing, or `THINFER_NATIVE_KERNELS=0` is set, `native_library()` returns None and says
why in `native_unavailable_reason()`; callers then use torch's own kernels.
`native_isa()` names the build that runs.
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
# Builds by instruction set, best first: extra compiler flags and the CPU flags they need.
ISAS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "avx512": (
        ("-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl"),
        ("avx512f", "avx512bw", "avx512dq", "avx512vl"),
    ),
    "avx2": ((), ()),
}
REQUIRED_CPU_FLAGS = ("avx2", "fma", "f16c")

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_reason: str | None = None
_isa: str | None = None
_loaded = False
_builds: dict[str, ctypes.CDLL] = {}

_i64, _ptr, _f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
SIGNATURES = {
    "add_rms_norm": (_ptr, _ptr, _ptr, _i64, _i64, _f32, _ptr, _ptr),
    "rope": (_ptr, _i64, _i64, _ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr),
    "silu_mul": (_ptr, _i64, _i64, _ptr),
    "paged_decode_attention": (
        *(_ptr, _i64, _i64, _i64, _i64, _i64),  # q, its row stride, seqs, q/kv heads, head dim
        *(_ptr, _ptr, _i64, _ptr, _i64),  # caches, block size, block tables and their width
        *(_ptr, _ptr, _f32, _ptr),  # each row's table (or NULL), context lengths, scale, out
    ),
    "q16_quantize": (_ptr, _i64, _i64, _ptr, _ptr, _ptr),
    "q4_linear": (_ptr, _i64, _i64, _ptr, _ptr, _i64, _ptr, _ptr),
    "q8_linear": (_ptr, _i64, _i64, _ptr, _ptr, _i64, _ptr, _ptr),
    "f32_linear": (_ptr, _i64, _i64, _ptr, _i64, _ptr, _ptr),
    "q4_dequantize": (_ptr, _ptr, _i64, _i64, _ptr),
    "q8_dequantize": (_ptr, _ptr, _i64, _i64, _ptr),
    "decoder_stack": (
        *(_ptr, _i64, _ptr, _ptr),  # stack, tokens, hidden, positions
        *(_ptr, _ptr, _i64, _ptr),  # slots, block tables and their width, context lengths
    ),
}
# Only in the AVX-512 build (`panel_products.c`).
AVX512_SIGNATURES = {
    "q4_panel_linear": (_ptr, _i64, _i64, _ptr, _ptr, _i64, _ptr, _ptr),
    "q8_panel_linear": (_ptr, _i64, _i64, _ptr, _ptr, _i64, _ptr, _ptr),
    "f32_panel_linear": (_ptr, _i64, _i64, _ptr, _i64, _ptr, _ptr),
}


def cache_dir() -> Path:
    """Where compiled kernels are kept."""
    root = os.environ.get("THINFER_CACHE") or Path.home() / ".cache" / "thinfer"
    return Path(root) / "kernels"


def _cpu_flags() -> set[str]:
    """The CPU's feature flags (empty where they cannot be read or it is not x86-64: no
    build is then risked, since a missing instruction kills the process)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next(
        (
            set(line.split(":", 1)[1].split())
            for line in text.splitlines()
            if line.startswith("flags")
        ),
        set(),
    )


def supported_isas() -> list[str]:
    """The builds of `ISAS` this CPU can run, best first."""
    flags = _cpu_flags()
    if not all(flag in flags for flag in REQUIRED_CPU_FLAGS):
        return []
    return [isa for isa, (_, needs) in ISAS.items() if all(flag in flags for flag in needs)]


def _compile(compiler: str, isa: str) -> Path:
    """The compiled library's path, compiling it first if this source and these flags have
    not been compiled yet (written to a temporary name, then renamed: concurrent processes
    never load a half-written file)."""
    flags = (*FLAGS, *ISAS[isa][0])
    digest = hashlib.sha256(" ".join(flags).encode() + compiler.encode())
    for source in SOURCES + HEADERS:
        digest.update(source.read_bytes())
    target = cache_dir() / f"thinfer-cpu-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        result = subprocess.run(
            [compiler, *flags, *map(str, SOURCES), "-o", str(built), "-lm"],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed on the CPU kernels: {result.stderr.strip()}")
        os.replace(built, target)
    return target


def load_build(isa: str) -> ctypes.CDLL:
    """The build of the kernels for `isa` (a key of `ISAS`), compiled if needed and loaded
    once per process. RuntimeError if this CPU cannot run it or it does not build."""
    if isa not in ISAS:
        raise ValueError(f"unknown kernel build {isa!r}; use one of {tuple(ISAS)}")
    if isa not in supported_isas():
        raise RuntimeError(f"this CPU cannot run the {isa} build of the kernels")
    with _lock:
        if isa not in _builds:
            compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
            if compiler is None:
                raise RuntimeError("no C compiler (cc or gcc) on PATH")
            try:
                library = ctypes.CDLL(str(_compile(compiler, isa)))
            except OSError as error:
                raise RuntimeError(str(error)) from error
            signatures = {**SIGNATURES, **(AVX512_SIGNATURES if isa == "avx512" else {})}
            for name, argtypes in signatures.items():
                function = getattr(library, name)
                function.argtypes = argtypes
                function.restype = None
            _builds[isa] = library
        return _builds[isa]


def _load() -> tuple[ctypes.CDLL | None, str | None, str | None]:
    """(library, why not, its build): the best build this CPU runs, or the one
    THINFER_NATIVE_ISA names."""
    if os.environ.get("THINFER_NATIVE_KERNELS", "1") == "0":
        return None, "disabled by THINFER_NATIVE_KERNELS=0", None
    isas = supported_isas()
    if not isas:
        return (
            None,
            f"the CPU lacks one of {', '.join(REQUIRED_CPU_FLAGS)} (or is not x86-64)",
            None,
        )
    wanted = os.environ.get("THINFER_NATIVE_ISA")
    if wanted:
        if wanted not in isas:
            return None, f"THINFER_NATIVE_ISA={wanted}: this CPU runs only {isas}", None
        isas = [wanted]
    try:
        return load_build(isas[0]), None, isas[0]
    except RuntimeError as error:
        return None, str(error), None


def native_library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None where it cannot run (see the module docstring)."""
    global _library, _reason, _isa, _loaded
    if _loaded:  # the per-call path of every kernel: no lock once loaded
        return _library
    library, reason, isa = _load()
    with _lock:
        if not _loaded:
            _library, _reason, _isa = library, reason, isa
            _loaded = True
    return _library


def native_unavailable_reason() -> str | None:
    """Why `native_library()` is None (None when it loaded)."""
    native_library()
    return _reason


def native_isa() -> str | None:
    """The build `native_library()` loaded ("avx512" or "avx2"), None when none did."""
    native_library()
    return _isa

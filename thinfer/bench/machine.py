"""`machine_info`: what a benchmark ran on, recorded next to its numbers."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

import torch


def _cpuinfo(field: str) -> str | None:
    """The first value of `field` in /proc/cpuinfo (None where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.split(":", 1)[0].strip().lower() == field:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def _native_kernels() -> str:
    """The build of thinfer's native CPU kernels that runs here, or why none does."""
    from thinfer.kernels.cpu_native import native_isa, native_unavailable_reason

    return native_isa() or f"none ({native_unavailable_reason()})"


def _meminfo_gib(field: str) -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return round(int(line.split()[1]) / 2**20, 2)  # kB -> GiB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, object]:
    """CPU, cores, RAM, library versions and accelerators of this machine."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info: dict[str, object] = {
        "cpu_model": _cpu_model(),
        "cpu_family": _cpuinfo("cpu family"),  # with cpu_model: which generation ran
        "cpu_native_kernels": _native_kernels(),
        "cpu_count": os.cpu_count(),
        "cpu_count_usable": usable,
        "ram_total_gib": _meminfo_gib("MemTotal"),
        "ram_available_gib": _meminfo_gib("MemAvailable"),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "thinfer": _version("thinfer"),
        "torch_num_threads": torch.get_num_threads(),
        "cuda_device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "cuda_device_name": None,
    }
    if info["cuda_device_count"]:
        info["cuda_device_name"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
    return info

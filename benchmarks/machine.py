"""Where a suite ran: CPU, cores, memory, GPU, load, and the versions of everything that decides the numbers."""
from __future__ import annotations

import os
import platform
import socket
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

_PACKAGES = ("torch", "zarr", "numpy", "mlflow", "kdtrack")


def describe(device: torch.device) -> dict[str, Any]:
    """CPU model, logical and usable cores, RAM, torch threads, load average, and the GPU when `device` is one."""
    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_bytes": _meminfo("MemTotal"),
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
        "gpu": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": props.name, "memory_bytes": props.total_memory, "count": torch.cuda.device_count(),
                       "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    return info


def versions() -> dict[str, str]:
    """python and the installed versions of torch, zarr, numpy, mlflow and kdtrack."""
    out = {"python": sys.version.split()[0]}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages: above the core count, other processes shared the CPU with the run."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _meminfo(key: str) -> int | None:
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024  # reported in kB
    return None

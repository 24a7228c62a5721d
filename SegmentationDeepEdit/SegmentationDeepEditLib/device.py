"""The one device picker: ``auto`` uses CUDA when present, else CPU; ``cpu``/``cuda`` force."""

from __future__ import annotations

import logging
from typing import Callable, TypeVar

import torch

from .errors import InputError

__all__ = ["pick_device", "run_with_fallback", "cpu_supports_bf16"]

log = logging.getLogger(__name__)
T = TypeVar("T")


def pick_device(preference: str = "auto") -> torch.device:
    """Resolve ``auto``/``cpu``/``cuda`` to a torch device.

    Raises:
        InputError: ``cuda`` asked for on a machine without a usable CUDA device, or an
            unknown name.
    """
    pref = (preference or "auto").lower()
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if pref == "cpu":
        return torch.device("cpu")
    if pref == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device cuda was asked for, but torch finds no CUDA device (use --device auto or cpu)")
        return torch.device("cuda")
    raise InputError(f"unknown device {preference!r} (use auto, cpu or cuda)")


def run_with_fallback(fn: Callable[[torch.device], T], device: torch.device, preference: str) -> tuple[T, torch.device]:
    """Run ``fn(device)``; under ``auto``, a CUDA out-of-memory error retries on the CPU.

    Returns:
        (result, the device actually used).
    """
    try:
        return fn(device), device
    except torch.cuda.OutOfMemoryError:
        if device.type != "cuda":
            raise
        if (preference or "auto").lower() != "auto":
            torch.cuda.empty_cache()
            raise InputError(f"the GPU ran out of memory ({_cuda_memory_text()}); use --device auto to fall back to "
                             "the CPU, or --device cpu, or close what else uses the GPU") from None
        log.warning("CUDA ran out of memory (%s); running on the CPU instead", _cuda_memory_text())
        torch.cuda.empty_cache()
        cpu = torch.device("cpu")
        return fn(cpu), cpu


def _cuda_memory_text() -> str:
    """'X GiB free of Y GiB' on the current CUDA device, or 'free memory unknown' when it cannot be read."""
    try:
        free, total = torch.cuda.mem_get_info()
    except Exception:  # noqa: BLE001 - only for a message
        return "free memory unknown"
    return f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB"


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bfloat16 arithmetic (AVX512-BF16 or AMX), where bf16
    autocast is 2-3x faster; elsewhere it is emulated and slower, so we keep fp32."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags

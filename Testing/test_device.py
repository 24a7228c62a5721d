"""The device picker and the GPU out-of-memory fallback, on any machine (CUDA itself: test_cuda.py)."""

from __future__ import annotations

import pytest
import torch

from SegmentationDeepEditLib.device import pick_device, run_with_fallback
from SegmentationDeepEditLib.errors import InputError


def _oom_on_cuda(calls):
    def fn(d):
        calls.append(d.type)
        if d.type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return "done"
    return fn


def test_out_of_memory_under_auto_runs_again_on_the_cpu():
    calls = []
    result, used = run_with_fallback(_oom_on_cuda(calls), torch.device("cuda"), "auto")
    assert (result, used.type, calls) == ("done", "cpu", ["cuda", "cpu"])


def test_out_of_memory_under_cuda_is_a_clear_error_and_no_cpu_run():
    calls = []
    with pytest.raises(InputError, match=r"GPU ran out of memory .*--device auto"):
        run_with_fallback(_oom_on_cuda(calls), torch.device("cuda"), "cuda")
    assert calls == ["cuda"]


def test_other_errors_are_not_retried():
    def fn(d):
        raise ValueError("a bug, not memory")
    with pytest.raises(ValueError):
        run_with_fallback(fn, torch.device("cuda"), "auto")


def test_pick_device_names():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InputError, match="unknown device"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA device"):
            pick_device("cuda")

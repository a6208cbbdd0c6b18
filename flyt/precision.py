"""Precision modes: fp32, amp (fp16 autocast), amp_bf16 (bf16 autocast), bf16 (bf16 weights)."""

from __future__ import annotations

import contextlib
import os

import torch

from flyt.config import PRECISIONS
from flyt.errors import FlytError

AUTOCAST_DTYPES = {"amp": torch.float16, "amp_bf16": torch.bfloat16}


def autocast(precision: str, device: torch.device | str):
    """The autocast context of a precision mode (a no-op for fp32 and bf16)."""
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def resolve_device(name: str | None, precision: str) -> torch.device:
    """--device (default: this process's GPU when there is one, else the CPU), checked against --precision."""
    if precision not in PRECISIONS:
        raise FlytError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if name is None:
        local = os.environ.get("LOCAL_RANK")
        name = (f"cuda:{local}" if local else "cuda") if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FlytError(f"--device {name!r} is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FlytError(f"--device {name}: CUDA is not available here")
    if precision == "amp" and device.type != "cuda":
        raise FlytError("--precision amp (fp16 autocast) needs a CUDA device; use fp32 or amp_bf16")
    return device

"""Precision modes: fp32, amp (fp16 autocast), amp_bf16 (bf16 autocast), bf16 (bf16 weights)."""

from __future__ import annotations

import contextlib

import torch

AUTOCAST_DTYPES = {"amp": torch.float16, "amp_bf16": torch.bfloat16}


def autocast(precision: str, device: torch.device | str):
    """The autocast context of a precision mode (a no-op for fp32 and bf16)."""
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)

"""Precision modes: fp32, amp (fp16 autocast), amp_bf16 (bf16 autocast), bf16 (bf16 weights).

The ``--precision`` flags take every spelling of OpenCLIP's training script (the original FLYT code uses
it): aliases map onto these modes, and the modes flyt does not run fail with what to use instead. torch is
imported inside the functions so that the configs can check names without loading it.
"""

from __future__ import annotations

import contextlib
import os

from flyt.errors import FlytError

PRECISIONS = ("fp32", "amp", "amp_bf16", "bf16")
ALIASES = {"amp_bfloat16": "amp_bf16"}
UNSUPPORTED = {  # OpenCLIP names flyt does not run -> what to use instead
    "fp16": "fp16 weights train without loss scaling; use amp (fp16 autocast with loss scaling) or bf16",
    "pure_fp16": "fp16 weights (norms included) train without loss scaling; use amp or bf16",
    "pure_bf16": "bf16 norms are not supported; use bf16 (bf16 weights, norms kept in fp32)",
}
SPELLINGS = (*PRECISIONS, *ALIASES, *UNSUPPORTED)


def parse_precision(name: str | None, supported: tuple[str, ...] = PRECISIONS) -> str | None:
    """The flyt mode of a ``--precision`` spelling (None stays None: the default is decided at run time)."""
    if name is None:
        return None
    mode = ALIASES.get(name, name)
    if mode in UNSUPPORTED:
        raise FlytError(f"--precision {name} is not supported: {UNSUPPORTED[mode]}")
    if mode not in supported:
        allowed = ", ".join(s for s in SPELLINGS if ALIASES.get(s, s) in supported)
        raise FlytError(f"--precision must be one of {allowed}, not {name!r}")
    return mode


def resolve_precision(name: str | None, supported: tuple[str, ...] = PRECISIONS) -> str:
    """``parse_precision``, and without the flag the original's default where it can run: amp on CUDA,
    else fp32; the choice is printed with the command's other log lines (stdout) so a log says which ran."""
    mode = parse_precision(name, supported)
    if mode is not None:
        return mode
    import torch

    mode = "amp" if torch.cuda.is_available() else "fp32"
    print(f"precision: {mode} (default {'on CUDA' if mode == 'amp' else 'without CUDA'})", flush=True)
    return mode


AUTOCAST_DTYPES = {"amp": "float16", "amp_bf16": "bfloat16"}


def autocast(precision: str, device):
    """The autocast context of a precision mode (a no-op for fp32 and bf16)."""
    import torch

    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, dtype))


def resolve_device(name: str | None, precision: str):
    """--device (default: this process's GPU when there is one, else the CPU), checked against --precision."""
    import torch

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

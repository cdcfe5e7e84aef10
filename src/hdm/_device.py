"""Which device a run computes on.

Random draws always come from CPU generators and then move to the device, so a seed gives the same
draws wherever the run computes, and a run made on a GPU can be repeated on a CPU (up to float rounding).
"""

from __future__ import annotations

import itertools

import torch

from ._data import HDMInputError

CHOICES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:N' or 'mps' -> a device this machine
    has; anything else is one line saying why not."""
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise HDMInputError(f"device {name!r}: not one of {CHOICES}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise HDMInputError(f"device {name!r}: this torch build or machine has no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise HDMInputError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise HDMInputError(f"device {name!r}: MPS is not available here")
    elif device.type != "cpu":
        raise HDMInputError(f"device {name!r}: not one of {CHOICES}")
    return device


def device_of(model) -> torch.device:
    """Where a model's tensors live; the CPU for anything that is not a torch module (an ONNX session)."""
    if isinstance(model, torch.nn.Module):
        for tensor in itertools.chain(model.buffers(), model.parameters()):
            return tensor.device
    return torch.device("cpu")


PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str, device: torch.device) -> None:
    """bf16 is opt-in and CUDA-only: on CPUs without AVX-512 bf16 runs many times slower than fp32."""
    if precision not in PRECISIONS:
        raise HDMInputError(f"precision {precision!r}: not one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and device.type != "cuda":
        raise HDMInputError(f"precision bf16 needs a CUDA device, not {device} (use fp32 there)")


def autocast(device: torch.device, precision: str):
    """The context the networks' forward passes run in: bf16 autocast when asked for, plain fp32 otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def checked_device(device: str | torch.device, precision: str) -> torch.device:
    """`resolve_device`, then `check_precision` on it: a placement refused in one line before any work."""
    resolved = resolve_device(device)
    check_precision(precision, resolved)
    return resolved


def place(model: torch.nn.Module, device: str | torch.device = "auto", precision: str = "fp32") -> torch.nn.Module:
    """Move a model to `device` (see `resolve_device`) and set the precision its networks run in."""
    resolved = checked_device(device, precision)
    model.precision = precision
    return model.to(resolved)

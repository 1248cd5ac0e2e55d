"""Pick a device and seed every random number generator.

Notebooks and tests call `pick_device()` instead of hard-coding "cuda" or "cpu", so the
same code runs on a laptop CPU, an Apple GPU (mps) and Colab/CUDA unchanged.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

ENV_VAR = "TITANS_DEVICE"


def _available(kind: str) -> bool:
    if kind == "cpu":
        return True
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return torch.backends.mps.is_available()
    return False


def pick_device(prefer: str | None = None) -> torch.device:
    """Return the device to run on.

    Order: the env var TITANS_DEVICE if set, else `prefer` if given, else the first
    available of cuda, mps, cpu. A requested device may carry an index ("cuda:1").
    Raises ValueError naming the request if it is not a valid or available device.
    """
    if prefer is not None and not isinstance(prefer, str):
        raise TypeError(f"prefer must be a str such as 'cuda' or None, got {type(prefer).__name__}")
    request = os.environ.get(ENV_VAR) or prefer
    if request is None:
        for kind in ("cuda", "mps"):
            if _available(kind):
                return torch.device(kind)
        return torch.device("cpu")
    source = f"{ENV_VAR}={request!r}" if os.environ.get(ENV_VAR) else f"prefer={request!r}"
    try:
        device = torch.device(request.strip().lower())
    except RuntimeError as err:
        raise ValueError(f"{source} is not a device; expected 'cpu', 'cuda', 'cuda:N' or 'mps'") from err
    if not _available(device.type):
        raise ValueError(f"{source} asks for {device.type!r}, which is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{source}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python's `random`, NumPy and torch (CPU and every CUDA device)."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds the CPU generator and every CUDA/MPS device's

"""Save and load a `TitansLM`: its config and weights in one file, loaded with `weights_only=True`.

`ASSETS` is the folder of files shipped inside the package (so they exist on Colab too):
the passkey model and results of `benchmarks/passkey.py` that notebook 05 loads, and the
long-context model and results of `benchmarks/long_context.py` that notebook 08 loads.

`torch.load(weights_only=True)` unpickles only tensors and plain containers, so a
checkpoint from someone else cannot run code on your machine. The config travels as a
plain dict and is validated again on load.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import torch

from .config import TitansConfig
from .models import TitansLM

ASSETS = files("titans_mini") / "assets"


def save_checkpoint(model: TitansLM, path: str | Path, **extra: int | float | str) -> None:
    """Write `model`'s config and weights (and any plain `extra` values, e.g. steps) to `path`."""
    if not isinstance(model, TitansLM):
        raise TypeError(f"model must be a TitansLM, got {type(model).__name__}")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save({"config": model.config.to_dict(), "state_dict": state, "extra": extra}, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[TitansLM, dict]:
    """The model saved at `path` (in eval mode) and the `extra` values saved with it."""
    data = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(data, dict) or not {"config", "state_dict"} <= set(data):
        raise ValueError(f"{path} is not a titans-mini checkpoint (expected keys 'config' and 'state_dict')")
    model = TitansLM(TitansConfig.from_dict(data["config"]))
    model.load_state_dict(data["state_dict"])
    return model.to(map_location).eval(), data.get("extra", {})

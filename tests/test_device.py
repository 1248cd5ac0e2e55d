"""pick_device: env override, preference order, clear errors; seed_everything: reproducibility."""
import random

import numpy as np
import pytest
import torch

from titans_mini.device import ENV_VAR, pick_device, seed_everything


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_default_is_the_first_available_of_cuda_mps_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert pick_device().type == expected


def test_env_var_overrides_prefer(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "cpu")
    assert pick_device(prefer="cuda") == torch.device("cpu")


def test_prefer_used_without_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert pick_device("CPU") == torch.device("cpu")


@pytest.mark.parametrize("bad", ["gpu", " ", "tpu0"])
def test_bad_env_value_raises_naming_it(monkeypatch, bad):
    monkeypatch.setenv(ENV_VAR, bad)
    with pytest.raises(ValueError, match=ENV_VAR):
        pick_device()


@pytest.mark.parametrize("kind", ["cuda", "mps"])
def test_unavailable_device_raises_naming_it(monkeypatch, kind):
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if available[kind]:
        pytest.skip(f"{kind} is available here")
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(ValueError, match=kind):
        pick_device(kind)


def test_prefer_wrong_type_raises():
    with pytest.raises(TypeError, match="prefer"):
        pick_device(0)  # type: ignore[arg-type]


def _draw() -> tuple[float, float, torch.Tensor]:
    return random.random(), float(np.random.rand()), torch.randn(5)


def test_seed_everything_reproduces_all_generators():
    seed_everything(123)
    a = _draw()
    seed_everything(123)
    b = _draw()
    seed_everything(124)
    c = _draw()
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    assert a[0] != c[0] and a[1] != c[1] and not torch.equal(a[2], c[2])


@pytest.mark.gpu
def test_seed_everything_reproduces_cuda():
    seed_everything(7)
    x = torch.randn(5, device="cuda")
    seed_everything(7)
    assert torch.equal(x, torch.randn(5, device="cuda"))


def test_seed_rejects_non_int():
    with pytest.raises(TypeError, match="seed"):
        seed_everything(1.5)  # type: ignore[arg-type]

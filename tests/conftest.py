"""Shared pytest set-up: tests marked `gpu` are skipped where CUDA is absent."""
import pytest
import torch

GPU_SKIP_REASON = "needs a CUDA device (run .ci/gpu-check on a GPU machine)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)

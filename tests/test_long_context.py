"""Long-context recall helpers: streamed evaluation and the memory's gate trace."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from titans_mini.config import TitansConfig
from titans_mini.models import TitansLM
from titans_mini.recall.long_context import gate_trace, streamed_recall, survival, time_per_token
from titans_mini.recall.tasks import passkey_prompts


def tiny(variant: str) -> TitansLM:
    torch.manual_seed(0)
    return TitansLM(TitansConfig(variant=variant, dim=16, n_layers=2, heads=2, window=8, chunk_size=4)).eval()


@pytest.mark.parametrize("variant", ["mac", "mal", "lmm"])
def test_streamed_recall_does_not_depend_on_the_piece_size(variant):
    model = tiny(variant)
    whole = streamed_recall(model, 40, n=32, piece=10_000)
    assert streamed_recall(model, 40, n=32, piece=7) == whole
    assert 0 <= whole <= 1


@pytest.mark.parametrize("variant", ["mac", "mag", "mal", "lmm"])
def test_gate_trace_covers_every_token_and_every_memory_layer(variant):
    model = tiny(variant)
    ids = passkey_prompts(3, 30, generator=torch.Generator().manual_seed(1))["prompt_ids"]
    whole, pieces = gate_trace(model, ids, piece=10_000), gate_trace(model, ids, piece=6)
    assert len(whole) == 2  # one memory per block
    for a, b in zip(whole, pieces):
        for name in ("theta", "eta", "alpha"):
            assert a[name].shape == ids.shape
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5)  # streaming changes nothing
        assert ((a["alpha"] > 0) & (a["alpha"] < 1)).all() and (a["eta"] < 0.9).all()


def test_gate_trace_refuses_a_model_without_memory():
    with pytest.raises(ValueError, match="NeuralMemory"):
        gate_trace(tiny("swa"), torch.ones(1, 5, dtype=torch.long))


def test_survival_is_the_product_of_what_each_step_keeps():
    alpha = torch.tensor([[0.5, 0.5, 0.0], [0.1, 0.2, 0.3]])
    torch.testing.assert_close(survival(alpha), torch.tensor([0.25, 0.9 * 0.8 * 0.7], dtype=torch.float64))


@pytest.mark.parametrize("variant", ["mac", "mag", "swa"])
def test_the_state_does_not_grow_with_the_context(variant):
    """800 more tokens (a whole number of memory chunks and windows) leave the state's size
    unchanged; it varies only with the position inside the current chunk and window."""
    model = tiny(variant)
    (ms_short, short), (ms_long, long) = (time_per_token(model, c, blocks=1, block=2) for c in (300, 1100))
    assert short == long > 0 and ms_short > 0 and ms_long > 0


@pytest.mark.slow
def test_the_long_context_benchmark_runs_and_ends_with_its_summary():
    done = subprocess.run([sys.executable, "-m", "benchmarks.long_context", "--quick", "--distances", "64", "128",
                           "--contexts", "256"], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-1].startswith("summary niah_best_16k=na variant=mac swa_16k=na full_attention_16k=na")
    assert any(line.startswith("distance     64") for line in lines)

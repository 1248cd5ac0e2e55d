"""Long-context recall helpers: streamed evaluation and the memory's gate trace."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from titans_mini.config import TitansConfig
from titans_mini.models import TitansLM
from titans_mini.memory import linear_memory_grad
from titans_mini.neural_memory import NeuralMemory
from titans_mini.recall.long_context import gate_trace, streamed_recall, surprise_trace, survival, time_per_token
from titans_mini.recall.tasks import passkey_prompts

ROOT = Path(__file__).resolve().parents[1]


def tiny(variant: str) -> TitansLM:
    torch.manual_seed(0)
    return TitansLM(TitansConfig(variant=variant, dim=16, n_layers=2, heads=2, window=8, chunk_size=4)).eval()


@pytest.mark.parametrize("variant", ["mac", "mal", "lmm"])
def test_streamed_recall_does_not_depend_on_the_piece_size(variant):
    model = tiny(variant)
    whole = streamed_recall(model, 40, n=32, piece=10_000)
    assert streamed_recall(model, 40, n=32, piece=7) == whole
    assert 0 <= whole <= 1


def test_streamed_recall_says_when_the_memory_diverged():
    model = tiny("lmm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a stable memory: no warning
        streamed_recall(model, 40, n=8)
    for memory in model.modules():
        if isinstance(memory, NeuralMemory):
            memory.theta_max = 1e4  # far past the stability bound (the constructor would warn)
    with pytest.warns(RuntimeWarning, match="of 8 prompts .* non-finite logits"):
        assert streamed_recall(model, 40, n=8) < 1


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


def test_surprise_trace_is_the_gradient_norm_at_each_chunks_start_weights():
    """For a linear memory the surprise has a closed form, 2 k^T (k W - v) (eq 12): its norm at
    every token, with W the weights the memory holds when the token's chunk starts, is the trace."""
    torch.manual_seed(0)
    memory = NeuralMemory(8, depth=1, chunk_size=4).eval()
    x = torch.randn(2, 13, 8)
    trace = surprise_trace(memory, x)
    state, expected = None, []
    with torch.no_grad():
        for part in x.split(4, dim=1):
            _, k, v, _ = memory.project(part, None if state is None else state.conv)
            w = (memory.initial_state(2) if state is None else state).weights[0]
            for t in range(part.shape[1]):
                expected.append(linear_memory_grad(w, k[:, t], v[:, t]).flatten(1).norm(dim=1))
            _, state = memory(part, state)
    torch.testing.assert_close(trace, torch.stack(expected, 1), rtol=1e-5, atol=1e-6)


def test_gate_trace_with_surprise_does_not_depend_on_the_piece_size():
    model = tiny("mal")
    ids = passkey_prompts(2, 30, generator=torch.Generator().manual_seed(1))["prompt_ids"]
    whole, pieces = (gate_trace(model, ids, piece=p, with_surprise=True) for p in (10_000, 7))
    for a, b in zip(whole, pieces):
        assert a["surprise"].shape == ids.shape and (a["surprise"] > 0).all()
        torch.testing.assert_close(a["surprise"], b["surprise"], rtol=1e-4, atol=1e-5)


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


def test_the_full_attention_cache_grows_with_the_context():
    model = tiny("transformer")
    (_, short), (_, long) = (time_per_token(model, c, blocks=1, block=2) for c in (300, 1100))
    assert long - short == 800 * 2 * model.config.dim * model.config.n_layers  # a key and a value per token and layer


def test_the_summary_names_the_best_memory_model_and_the_baselines(tmp_path):
    """--quick reads the trained models' records from the results file: the summary names the
    best memory variant at 16,384 (mean over its seeds) and the two attention baselines."""
    records = [{"name": name, "variant": name, "seed": seed, "accuracy": {"filler": {"16384": acc}}}
               for name, seed, acc in (("swa", 0, 0.0), ("mag", 0, 0.5), ("mal", 0, 0.55), ("mag", 1, 0.7),
                                       ("transformer", 0, 0.02))]
    (tmp_path / "results.json").write_text(json.dumps({"records": records}))
    done = subprocess.run([sys.executable, "-m", "benchmarks.long_context", "--quick", "--distances", "64",
                           "--results", str(tmp_path / "results.json")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert any(line.strip().startswith("filler: 64:") for line in lines)  # the shipped models, measured live
    last = lines[-1]
    assert last == "summary niah_best_16k=0.600 variant=mag swa_16k=0.000 full_attention_16k=0.020"

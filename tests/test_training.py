"""Passkey training helpers, and the experiment script `python -m benchmarks.passkey` run as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from titans_mini.checkpoint import load_checkpoint
from titans_mini.config import TitansConfig
from titans_mini.models import TitansLM
from titans_mini.recall.tasks import passkey_batch
from titans_mini.recall.training import curriculum_distance, passkey_loss, train_passkey

ROOT = Path(__file__).resolve().parents[1]


def test_curriculum_starts_short_and_reaches_the_longest_distance():
    generator = torch.Generator().manual_seed(0)
    steps, distances = 200, (2, 64)
    drawn = [curriculum_distance(step, steps, distances, 0.5, generator) for step in range(steps)]
    assert all(2 <= d <= 64 for d in drawn)
    assert max(drawn[:10]) <= 5                     # the top starts at 4 and grows slowly
    assert max(drawn[100:]) > 48                    # after half the steps: the whole range
    tops = [max(drawn[i : i + 20]) for i in range(0, 100, 20)]
    assert tops == sorted(tops)                     # the reachable range only grows


def test_no_curriculum_draws_the_whole_range_from_the_start():
    generator = torch.Generator().manual_seed(0)
    drawn = [curriculum_distance(0, 100, (2, 64), 0.0, generator) for _ in range(200)]
    assert min(drawn) <= 4 and max(drawn) >= 60


@pytest.mark.parametrize("kwargs, match", [
    ({"curriculum": 1.5}, "curriculum"),
    ({"distances": (8, 4)}, "distances"),
    ({"seq_len": 10}, "seq_len"),
    ({"steps": 0}, "steps"),
    ({"backprop": 1}, "backprop"),
])
def test_train_passkey_refuses_bad_arguments(kwargs, match):
    model = TitansLM(TitansConfig(variant="swa", dim=16, n_layers=1, heads=2, window=8))
    args = {"steps": 2, "distances": (2, 8), "seq_len": 20} | kwargs
    with pytest.raises(ValueError, match=match):
        train_passkey(model, args.pop("steps"), progress=False, **args)


@pytest.mark.slow
def test_the_passkey_experiment_runs_records_every_distance_and_saves_loadable_models(tmp_path):
    """`python -m benchmarks.passkey` as a user runs it (a tiny budget): every run is recorded
    at every evaluation distance, the ablations skip what the variant lacks, models load."""
    results = tmp_path / "results.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.passkey", "--quick", "--steps", "2", "--variants", "lmm",
                           "mag", "--set", "dim=16", "heads=2", "--json", str(results), "--save", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(results.read_text())
    names = [r["name"] for r in data["records"]]
    assert names == ["lmm", "mag", "lmm no momentum", "lmm no forgetting", "lmm linear memory", "lmm no convolution"]
    for record in data["records"]:
        assert [int(d) for d in record["accuracy"]] == data["eval_distances"]
        assert all(0 <= a <= 1 for a in record["accuracy"].values())
    for record in data["records"][:2]:
        model, extra = load_checkpoint(tmp_path / f"{record['name']}.pt")
        assert model.config.to_dict() == record["config"] and model.config.dim == 16
        assert extra == {"steps": 2, "seed": 0} and model.num_parameters() == record["parameters"]


def test_distractor_pairs_fit_between_needle_and_question():
    from titans_mini.recall.tasks import KEY, passkey_batch
    from titans_mini.recall.training import pairs_at
    assert [pairs_at(d, 4) for d in (1, 3, 4, 7, 13, 64)] == [1, 1, 2, 3, 5, 5]
    assert pairs_at(64, 0) == 1
    for distance in (4, 10, 40):
        batch = passkey_batch(8, distance, n_pairs=pairs_at(distance, 4), generator=torch.Generator().manual_seed(0))
        assert ((batch["input_ids"] == KEY).sum(1) == pairs_at(distance, 4)).all()  # passkey_batch builds them


@pytest.mark.parametrize("steps", [1, 2, 3, 7, 10, 11])
def test_train_passkey_runs_any_number_of_steps(steps):
    """The learning-rate schedule must not break short runs (OneCycleLR divides by its phase length)."""
    torch.manual_seed(0)
    model = TitansLM(TitansConfig(variant="lmm", dim=16, n_layers=1, heads=2, window=8, chunk_size=4))
    history = train_passkey(model, steps, distances=(2, 6), seq_len=12, batch_size=4, progress=False)
    assert len(history) == steps and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)


@pytest.mark.parametrize("variant", ["lmm", "mac", "mag", "mal"])
def test_truncated_backprop_has_the_full_rows_loss_and_the_gradient_of_a_state_cut_at_the_same_place(variant):
    """backprop=b: the same loss as one pass over the row (the prefix streamed in pieces), and the
    gradient of a pass whose state is detached b tokens before the end; a true cut, not the full gradient."""
    torch.manual_seed(0)
    model = TitansLM(TitansConfig(variant=variant, dim=16, n_layers=2, heads=2, window=8, chunk_size=4))
    batch = passkey_batch(3, 2100, seq_len=2110, generator=torch.Generator().manual_seed(0))
    ids, cut = batch["input_ids"], 2110 - 30  # a prefix of 2,080 tokens: three pieces of `stream`

    def gradients(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    truncated = passkey_loss(model, batch, backprop=30)[0]
    got = gradients(truncated)
    _, state = model(ids[:, :cut])
    logits, _ = model(ids[:, cut:], state.detach())
    cut_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"][:, cut:].flatten())
    want = gradients(cut_loss)
    full = gradients(passkey_loss(model, batch)[0])
    torch.testing.assert_close(truncated, passkey_loss(model, batch)[0], rtol=1e-5, atol=1e-6)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7, msg=name)
    assert len(full) > len(got) or any(not torch.allclose(full[n], got[n], atol=1e-6) for n in got)


def test_truncated_backprop_refuses_a_cut_that_leaves_an_answer_behind():
    model = TitansLM(TitansConfig(variant="lmm", dim=16, n_layers=1, heads=2, window=8, chunk_size=4))
    batch = passkey_batch(2, 20, seq_len=60, generator=torch.Generator().manual_seed(0))
    batch["targets"][:, 5] = 7  # an answer early in the row
    with pytest.raises(ValueError, match="backprop"):
        passkey_loss(model, batch, backprop=16)


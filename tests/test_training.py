"""Passkey training helpers and the experiment script of benchmarks/passkey.py."""

import pytest
import torch

from benchmarks import passkey
from titans_mini.checkpoint import load_checkpoint
from titans_mini.config import TitansConfig
from titans_mini.models import TitansLM
from titans_mini.recall.training import curriculum_distance, train_passkey


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
])
def test_train_passkey_refuses_bad_arguments(kwargs, match):
    model = TitansLM(TitansConfig(variant="swa", dim=16, n_layers=1, heads=2, window=8))
    args = {"steps": 2, "distances": (2, 8), "seq_len": 20} | kwargs
    with pytest.raises(ValueError, match=match):
        train_passkey(model, args.pop("steps"), progress=False, **args)


def test_experiment_run_records_every_distance_and_saves_a_loadable_model(tmp_path):
    config = TitansConfig(variant="mag", dim=16, n_layers=1, heads=2, window=8, chunk_size=4)
    budget = passkey.Budget(steps=3, distances=(2, 16), slack=4)
    record = passkey.run("mag", config, budget, seed=0, save=str(tmp_path / "mag.pt"))
    assert set(record["accuracy"]) == set(passkey.EVAL_DISTANCES)
    assert all(0 <= a <= 1 for a in record["accuracy"].values())
    model, extra = load_checkpoint(tmp_path / "mag.pt")
    assert model.config == config and extra == {"steps": 3, "seed": 0}
    assert record["parameters"] == model.num_parameters()


def test_ablations_of_the_memory_alone_skip_persistent_tokens():
    assert "no persistent" not in passkey.ablations("lmm")
    assert "no persistent" in passkey.ablations("mac")
    for name, (change, _) in passkey.ablations("mac").items():
        TitansConfig(variant="mac").replace(**change)  # every ablation is a valid config


def test_distractor_pairs_fit_between_needle_and_question():
    from titans_mini.recall.tasks import KEY, passkey_batch
    from titans_mini.recall.training import pairs_at
    assert [pairs_at(d, 4) for d in (1, 3, 4, 7, 13, 64)] == [1, 1, 2, 3, 5, 5]
    assert pairs_at(64, 0) == 1
    for distance in (4, 10, 40):
        batch = passkey_batch(8, distance, n_pairs=pairs_at(distance, 4), generator=torch.Generator().manual_seed(0))
        assert ((batch["input_ids"] == KEY).sum(1) == pairs_at(distance, 4)).all()  # passkey_batch builds them

"""GRPO on passkey recall (`titans_mini.recall.rl`, `benchmarks/grpo_recall.py`).

The accuracy measures against a model with known output probabilities, the set-up's
validation, and one tiny end-to-end run of the script's `run` (a one-layer memory-only
TitansLM, ~10 s on one CPU thread): pre-training stops early, GRPO raises the
probability of the right answer on held-out prompts, the printed lines have the
documented format and agree with the returned numbers, and the collapse section ends
with (nearly) every group's rewards equal and the reward far below where it began.
"""

import re
from dataclasses import replace

import pytest
import torch
from torch import nn

from benchmarks.grpo_recall import collapse, run, run_seed
from titans_mini.config import TitansConfig
from titans_mini.device import pick_device
from titans_mini.grpo import GRPOSettings
from titans_mini.recall.rl import RecallSetup, prompt_set, recall_accuracy
from titans_mini.recall.tasks import VALUE0, VOCAB_SIZE

FLOAT = r"(\d+\.\d+)"


class FixedAnswer(nn.Module):
    """Last-position probabilities: `p_right` on the right value, the rest spread over the other tokens.

    The right value is read from the prompt (position 3 holds it), so the model is exact.
    """

    def __init__(self, p_right: float):
        super().__init__()
        self.p_right = p_right
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, ids):
        probs = torch.full((ids.shape[0], ids.shape[1], VOCAB_SIZE), (1 - self.p_right) / (VOCAB_SIZE - 1))
        probs[torch.arange(ids.shape[0]), -1, ids[:, 3]] = self.p_right
        return probs.log(), None


def test_recall_accuracy_measures():
    prompts, answers = prompt_set(400, 6, seed=0, device="cpu")
    assert (prompts[:, 3] == answers).all() and (answers >= VALUE0).all()
    for p in (0.3, 0.9):
        acc = recall_accuracy(FixedAnswer(p), prompts, answers, samples=50)
        assert acc["expected"] == pytest.approx(p, abs=1e-5)
        assert acc["greedy"] == 1.0  # p > the other tokens' share
        assert acc["sampled"] == pytest.approx(p, abs=4 * (p * (1 - p) / 20_000) ** 0.5)
    acc = recall_accuracy(FixedAnswer(0.001), prompts, answers, samples=50)
    assert acc["greedy"] == 0.0 and acc["sampled"] < 0.01


def test_setup_validation_and_collapse_settings():
    with pytest.raises(ValueError, match="distance"):
        RecallSetup(distance=0)
    with pytest.raises(ValueError, match="stop_at"):
        RecallSetup(stop_at=1.5)
    with pytest.raises(TypeError, match="GRPOSettings"):
        RecallSetup(grpo={"lr": 1e-3})
    setup = RecallSetup()
    bad = collapse(setup, steps=7)
    assert bad.grpo.group_size == 2 and bad.grpo.lr == pytest.approx(30 * setup.grpo.lr) and bad.grpo_steps == 7
    assert bad.prompts_per_step * 2 == setup.prompts_per_step * setup.grpo.group_size  # same samples per step


@pytest.mark.slow
def test_tiny_run_grpo_raises_recall_and_collapse_stalls(capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest
    setup = RecallSetup(
        model=TitansConfig(dim=32, n_layers=1, window=8, chunk_size=4, variant="lmm"),
        distance=8, warmup_distance=4, warmup_steps=0, max_pretrain_steps=300, pretrain_lr=1e-2,
        grpo=GRPOSettings(group_size=8, max_new_tokens=1, lr=2e-3), grpo_steps=20, eval_prompts=256,
    )
    try:
        (result,) = run(setup, [0], pick_device(), collapse_steps=10)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out

    assert result["pretrain_steps"] < setup.max_pretrain_steps  # stopped early, at stop_at
    before, after = result["before"], result["after"]
    assert 0.1 < before["expected"] < 0.4  # above chance (1/64), far from perfect
    assert after["expected"] > before["expected"] + 0.02  # exact expectation: no sampling noise
    assert after["sampled"] >= before["sampled"]
    assert len(result["history"]) == setup.grpo_steps

    seed = re.search(rf"^seed=0 before={FLOAT} after={FLOAT} gain=([+-]\d+\.\d+)$", out, re.M)
    summary = re.search(rf"^summary mean_before={FLOAT} mean_after={FLOAT} mean_gain=([+-]\d+\.\d+)$", out, re.M)
    assert seed and summary, out
    assert float(seed[1]) == pytest.approx(before["sampled"], abs=1e-3)
    assert float(seed[2]) == pytest.approx(after["sampled"], abs=1e-3)
    assert seed.groups() == summary.groups()  # one seed: the mean is that seed

    fall = re.search(rf"^collapse summary: reward {FLOAT} -> {FLOAT}, zero_std_frac {FLOAT} -> {FLOAT}", out, re.M)
    assert fall, out
    reward_first, reward_last, zero_first, zero_last = map(float, fall.groups())
    assert zero_last >= 0.9 and zero_last > zero_first
    assert reward_last < reward_first / 2


@pytest.mark.slow
def test_seed_runs_are_reproducible():
    setup = RecallSetup(
        model=TitansConfig(dim=16, n_layers=1, window=8, chunk_size=4, variant="lmm"),
        distance=6, warmup_steps=0, max_pretrain_steps=10, grpo_steps=2, eval_prompts=64, stop_at=1.0,
    )
    setup = replace(setup, grpo=replace(setup.grpo, group_size=4))
    a, b = (run_seed(setup, 3, torch.device("cpu")) for _ in range(2))
    assert a["pretrain_steps"] == b["pretrain_steps"] == 10
    assert a["before"] == b["before"] and a["after"] == b["after"]
    assert [h["reward_mean"] for h in a["history"]] == [h["reward_mean"] for h in b["history"]]

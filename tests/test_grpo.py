"""Tests for titans_mini.grpo: every formula against a hand-computed case, plus the
properties GRPO relies on (ratio 1 == policy gradient, masking, zero-std groups, reuse)."""

import copy
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from titans_mini.grpo import (
    GRPOSettings,
    aggregate,
    clipped_surrogate,
    completion_log_probs,
    group_advantages,
    grpo_loss,
    grpo_step,
    k3_kl,
    logits_of,
    make_optimizer,
    sample_completions,
)


class Bigram(nn.Module):
    """logits[b, t] = table[ids[b, t]]: the smallest causal LM."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)

    def forward(self, ids):
        return self.table(ids)


class TinyGRU(nn.Module):
    """Embedding -> GRU -> Linear, returning (logits, state) like TitansLM."""

    def __init__(self, vocab: int = 7, dim: int = 16):
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, vocab)
        self.rnn = nn.GRU(dim, dim, batch_first=True)

    def forward(self, ids):
        h, state = self.rnn(self.emb(ids))
        return self.head(h), state


class HFStyle(nn.Module):
    """Wraps a model so it returns an object with .logits, like Hugging Face."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, ids):
        return SimpleNamespace(logits=logits_of(self.inner(ids)), past_key_values=None)


def lse(xs):
    return math.log(sum(math.exp(x) for x in xs))


# ---------------------------------------------------------------- model outputs, log-probs


def test_logits_of_accepts_three_formats_and_rejects_others():
    x = torch.randn(2, 3, 4)
    assert logits_of(x) is x
    assert logits_of((x, "state")) is x
    assert logits_of(SimpleNamespace(logits=x)) is x
    with pytest.raises(TypeError, match="logits"):
        logits_of({"logits": x})


def test_completion_log_probs_hand_computed():
    model = Bigram(3)
    rows = [[0.0, 1.0, 2.0], [0.5, -1.0, 0.0], [3.0, 0.0, -2.0]]
    with torch.no_grad():
        model.table.weight.copy_(torch.tensor(rows))
    prompts, completions = torch.tensor([[1, 0]]), torch.tensor([[2, 1]])
    # o_0 = 2 is predicted after prompt token 0, o_1 = 1 after token 2
    want = [rows[0][2] - lse(rows[0]), rows[2][1] - lse(rows[2])]
    got = completion_log_probs(model, prompts, completions)
    assert got.dtype == torch.float32 and got.shape == (1, 2)
    assert got[0].tolist() == pytest.approx(want, abs=1e-6)
    # temperature divides the logits before the softmax
    want_t = rows[2][1] / 2 - lse([v / 2 for v in rows[2]])
    got_t = completion_log_probs(model, prompts, completions, temperature=2.0)[0, 1].item()
    assert got_t == pytest.approx(want_t, abs=1e-6)


def test_completion_log_probs_same_for_tuple_and_hf_outputs():
    torch.manual_seed(0)
    model = TinyGRU()
    prompts, completions = torch.randint(0, 7, (3, 4)), torch.randint(0, 7, (3, 5))
    a = completion_log_probs(model, prompts, completions)
    b = completion_log_probs(HFStyle(model), prompts, completions)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_completion_log_probs_rejects_bad_inputs():
    model = Bigram(3)
    with pytest.raises(ValueError, match="prompts"):
        completion_log_probs(model, torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="completions"):
        completion_log_probs(model, torch.zeros(1, 2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="same batch"):
        completion_log_probs(model, torch.zeros(1, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long))


# ---------------------------------------------------------------- sampling


def test_near_zero_temperature_sampling_is_greedy():
    torch.manual_seed(1)
    model = TinyGRU()
    prompts = torch.randint(0, 7, (2, 3))
    gen = torch.Generator().manual_seed(0)
    comp, _, mask = sample_completions(model, prompts, 3, 6, temperature=1e-4, generator=gen)
    seq = prompts
    for _ in range(6):  # greedy decoding by hand
        seq = torch.cat([seq, logits_of(model(seq))[:, -1].argmax(-1, keepdim=True)], 1)
    torch.testing.assert_close(comp, seq[:, 3:].repeat_interleave(3, 0))
    assert comp.shape == (6, 6) and bool((mask == 1).all())


def test_recorded_log_probs_equal_recomputed_and_eos_masking():
    torch.manual_seed(2)
    model = Bigram(5)
    prompts = torch.randint(1, 5, (3, 2))
    gen = torch.Generator().manual_seed(0)
    comp, logp, mask = sample_completions(model, prompts, 4, 8, temperature=0.7, eos_id=0, generator=gen)
    recomputed = completion_log_probs(model, prompts.repeat_interleave(4, 0), comp, temperature=0.7)
    torch.testing.assert_close(logp, recomputed * mask)
    assert bool((mask == 0).any()), "seed should produce at least one early eos"
    for row_tokens, row_mask in zip(comp.tolist(), mask.tolist()):
        n = int(sum(row_mask))
        assert row_mask == [1.0] * n + [0.0] * (len(row_mask) - n)  # active prefix, then padding
        assert 0 not in row_tokens[: n - 1]  # no eos before the end of the active part
        if n < len(row_tokens):
            assert row_tokens[n - 1] == 0 and set(row_tokens[n:]) == {0}  # eos kept active, pad = eos


def test_sampling_is_reproducible_with_a_generator():
    model = TinyGRU()
    prompts = torch.randint(0, 7, (2, 3))
    a = sample_completions(model, prompts, 4, 5, generator=torch.Generator().manual_seed(7))[0]
    b = sample_completions(model, prompts, 4, 5, generator=torch.Generator().manual_seed(7))[0]
    assert torch.equal(a, b)


# ---------------------------------------------------------------- formulas by hand


def test_group_advantages_hand_computed_and_equal_rewards_give_zero():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 3.0, 3.0, 3.0])
    std = math.sqrt(4 * 0.5**2 / 3)  # Bessel: divide by G - 1
    a = 0.5 / (std + 1e-4)
    got = group_advantages(rewards, 4)
    assert got.tolist() == pytest.approx([a, -a, -a, a, 0, 0, 0, 0], abs=1e-6)
    assert not bool(got.isnan().any())
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(rewards, 3)


def test_clipped_surrogate_hand_computed():
    ratios = [1.5, 0.5, 0.5, 1.5, 1.25]
    advs = [2.0, 2.0, -1.0, -1.0, 1.0]
    old = torch.zeros(5, 1)
    logp = torch.log(torch.tensor(ratios))[:, None].requires_grad_()
    # eps = 0.2: min(rho A, clip(rho, 0.8, 1.2) A)
    want = [-min(1.5 * 2, 1.2 * 2), -min(0.5 * 2, 0.8 * 2), -min(-0.5, -0.8), -min(-1.5, -1.2), -min(1.25, 1.2)]
    loss, clipped = clipped_surrogate(logp, old, torch.tensor(advs), 0.2)
    assert loss[:, 0].tolist() == pytest.approx(want, abs=1e-6)
    assert clipped[:, 0].tolist() == [True, False, True, False, True]
    # the clipped branch carries no gradient; the others d(-rho A)/dlogp = -rho A
    loss.sum().backward()
    want_grad = [0.0 if c else -r * a for r, a, c in zip(ratios, advs, clipped[:, 0].tolist())]
    assert logp.grad[:, 0].tolist() == pytest.approx(want_grad, abs=1e-6)
    # asymmetric clipping: eps_high = 0.28 lets rho = 1.25 through
    loss_hi, clipped_hi = clipped_surrogate(logp.detach(), old, torch.tensor(advs), 0.2, epsilon_high=0.28)
    assert loss_hi[4, 0].item() == pytest.approx(-1.25) and not clipped_hi[4, 0]


def test_k3_kl_hand_computed_nonnegative_and_zero_at_reference():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0])
    want = [math.exp(-1) + 1 - 1, math.exp(1) - 1 - 1]  # exp(d) - d - 1, d = ref - logp
    assert k3_kl(logp, ref).tolist() == pytest.approx(want, abs=1e-6)
    torch.manual_seed(3)
    a, b = -torch.rand(1000) * 10, -torch.rand(1000) * 10
    assert bool((k3_kl(a, b) >= 0).all())
    assert bool((k3_kl(a, a) == 0).all())


def test_aggregations_hand_computed_and_differ_on_unequal_lengths():
    loss = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    assert aggregate(loss, mask, "grpo").item() == pytest.approx((10 / 4 + 11 / 2) / 2)  # 4.0
    assert aggregate(loss, mask, "dapo").item() == pytest.approx(21 / 6)  # 3.5
    assert aggregate(loss, mask, "dr_grpo", max_completion_length=8).item() == pytest.approx(21 / 16)
    assert aggregate(loss, mask, "dr_grpo").item() == pytest.approx(21 / 8)  # default: padded length
    # equal lengths, full mask: all three agree when max_completion_length = T
    full = torch.ones_like(mask)
    values = {t: aggregate(loss, full, t, 4).item() for t in ("grpo", "dr_grpo", "dapo")}
    assert values["grpo"] == pytest.approx(values["dapo"]) == pytest.approx(values["dr_grpo"])
    # per-token weight: grpo gives the short completion's tokens 1/(B*2), the long one's 1/(B*4)
    x = loss.clone().requires_grad_()
    aggregate(x, mask, "grpo").backward()
    assert x.grad.flatten().tolist() == pytest.approx([1 / 8] * 4 + [1 / 4, 1 / 4, 0, 0])
    with pytest.raises(ValueError, match="loss_type"):
        aggregate(loss, mask, "bnpo")


# ---------------------------------------------------------------- properties of the loss


def _batch(seed: int = 4):
    torch.manual_seed(seed)
    model = TinyGRU()
    prompts = torch.randint(0, 7, (2, 3)).repeat_interleave(4, 0)
    comp = torch.randint(0, 7, (8, 5))
    mask = torch.ones(8, 5)
    mask[1, 3:] = 0
    mask[6, 1:] = 0
    adv = group_advantages(torch.rand(8), 4)
    return model, prompts, comp, mask, adv


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_ratio_one_gradient_equals_policy_gradient(loss_type):
    model, prompts, comp, mask, adv = _batch()
    settings = GRPOSettings(group_size=4, max_new_tokens=5, loss_type=loss_type)
    logp = completion_log_probs(model, prompts, comp)
    assert bool((torch.exp(logp - logp.detach()) == 1).all())
    loss, stats = grpo_loss(logp, logp.detach(), adv, mask, settings)
    grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    pg = aggregate(-(adv[:, None] * logp), mask, loss_type, 5)
    pg_grads = torch.autograd.grad(pg, list(model.parameters()))
    for g, h in zip(grads, pg_grads):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-7)
    assert stats["clip_fraction"] == 0 and stats["ratio_dev"] == 0 and math.isnan(stats["kl"])
    assert any(g.abs().sum() > 0 for g in grads)  # a real, non-zero gradient


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_padded_tokens_change_neither_loss_nor_gradient(loss_type):
    _, _, _, mask, adv = _batch()
    torch.manual_seed(5)
    settings = GRPOSettings(group_size=4, max_new_tokens=5, loss_type=loss_type, beta=0.1)
    logp, old, ref = (-torch.rand(8, 5) * 3 for _ in range(3))
    noise = (torch.randn(3, 8, 5) * 2) * (1 - mask)  # only on padded positions

    def loss_and_grad(lp, o, r):
        lp = lp.clone().requires_grad_()
        loss, stats = grpo_loss(lp, o, adv, mask, settings, r)
        loss.backward()
        return loss, lp.grad, stats

    l1, g1, s1 = loss_and_grad(logp, old, ref)
    l2, g2, s2 = loss_and_grad(logp + noise[0], old + noise[1], ref + noise[2])
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(g1, g2)
    assert bool((g1[mask == 0] == 0).all())
    assert s1 == pytest.approx(s2)


# ---------------------------------------------------------------- the training step


class SpySGD(torch.optim.SGD):
    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.steps = 0

    def step(self, closure=None):
        self.steps += 1
        return super().step(closure)


def _reward_count(token):
    calls = []

    def reward_fn(prompts, completions, mask):
        calls.append(completions.clone())
        assert prompts.shape[0] == completions.shape[0]
        return ((completions == token).float() * mask).sum(1) / mask.sum(1)

    return reward_fn, calls


@pytest.mark.parametrize("num_iterations", [1, 2])
def test_num_iterations_reuses_samples_and_moves_the_ratio(num_iterations):
    torch.manual_seed(6)
    policy = TinyGRU()
    settings = GRPOSettings(group_size=8, max_new_tokens=6, num_iterations=num_iterations, lr=0.5)
    opt = SpySGD(policy.parameters(), lr=settings.lr)
    reward_fn, calls = _reward_count(3)
    m = grpo_step(policy, None, opt, torch.randint(0, 7, (4, 3)), reward_fn, settings, torch.Generator().manual_seed(0))
    assert opt.steps == num_iterations and len(calls) == 1  # one batch of samples, reused
    if num_iterations == 1:
        assert m["ratio_dev"] == 0  # rho == 1 exactly against the old policy
    else:
        assert m["ratio_dev"] > 1e-4  # the 2nd iteration sees rho != 1


def test_equal_rewards_give_zero_std_groups_and_no_update():
    torch.manual_seed(7)
    policy = TinyGRU()
    before = copy.deepcopy(policy.state_dict())
    settings = GRPOSettings(group_size=4, max_new_tokens=4)
    m = grpo_step(policy, None, make_optimizer(policy, settings), torch.randint(0, 7, (3, 2)),
                  lambda p, c, mask: torch.ones(c.shape[0]), settings)
    assert m["zero_std_frac"] == 1 and m["reward_std"] == 0 and m["grad_norm"] == 0
    assert all(math.isfinite(v) for k, v in m.items() if k != "kl")
    for k, v in policy.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_kl_is_zero_against_an_identical_reference_and_reference_is_required():
    torch.manual_seed(8)
    policy = TinyGRU()
    ref = copy.deepcopy(policy).requires_grad_(False)
    settings = GRPOSettings(group_size=4, max_new_tokens=4, beta=0.1)
    prompts, reward_fn = torch.randint(0, 7, (2, 2)), _reward_count(2)[0]
    m = grpo_step(policy, ref, make_optimizer(policy, settings), prompts, reward_fn, settings)
    assert m["kl"] == 0
    m = grpo_step(policy, ref, make_optimizer(policy, settings), prompts, reward_fn, settings)
    assert m["kl"] > 0  # the policy moved away from the reference
    with pytest.raises(ValueError, match="ref_policy"):
        grpo_step(policy, None, make_optimizer(policy, settings), prompts, reward_fn, settings)


def test_reward_fn_must_return_one_reward_per_completion():
    policy = TinyGRU()
    settings = GRPOSettings(group_size=2, max_new_tokens=2)
    with pytest.raises(ValueError, match="reward_fn"):
        grpo_step(policy, None, make_optimizer(policy, settings), torch.zeros(2, 2, dtype=torch.long),
                  lambda p, c, m: torch.ones(3), settings)


@pytest.mark.slow
def test_grpo_learns_a_keyword_reward():
    torch.manual_seed(9)
    policy = Bigram(6)
    settings = GRPOSettings(group_size=8, max_new_tokens=4, lr=0.1)
    opt, gen = make_optimizer(policy, settings), torch.Generator().manual_seed(0)
    reward_fn = _reward_count(4)[0]
    prompts = torch.randint(0, 6, (8, 2))
    rewards = [grpo_step(policy, None, opt, prompts, reward_fn, settings, gen)["reward_mean"] for _ in range(40)]
    assert sum(rewards[:5]) / 5 < 0.35  # chance is 1/6
    assert sum(rewards[-5:]) / 5 > 0.8


@pytest.mark.gpu
def test_grpo_step_on_cuda_matches_recomputed_log_probs():
    torch.manual_seed(10)
    policy = TinyGRU().cuda()
    settings = GRPOSettings(group_size=4, max_new_tokens=5, eos_id=0, num_iterations=2)
    prompts, gen = torch.randint(1, 7, (3, 2), device="cuda"), torch.Generator(device="cuda").manual_seed(0)
    comp, logp, mask = sample_completions(policy, prompts, 4, 5, eos_id=0, generator=gen)
    recomputed = completion_log_probs(policy, prompts.repeat_interleave(4, 0), comp)
    torch.testing.assert_close(logp, recomputed * mask, rtol=1e-4, atol=1e-5)
    m = grpo_step(policy, None, make_optimizer(policy, settings), prompts, _reward_count(3)[0], settings, gen)
    assert all(math.isfinite(v) for k, v in m.items() if k != "kl")


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "field, value",
    [("group_size", 1), ("group_size", 2.0), ("temperature", 0.0), ("max_new_tokens", 0), ("eos_id", -1),
     ("epsilon", 0.0), ("epsilon", 1.0), ("epsilon_high", 0.0), ("beta", -0.1), ("loss_type", "bnpo"),
     ("num_iterations", 0), ("lr", 0.0), ("advantage_eps", -1.0), ("max_grad_norm", 0.0)],
)
def test_bad_settings_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"GRPOSettings.{field} "):
        GRPOSettings(**{field: value})


def test_defaults_follow_trl():
    """The settings TRL also has default to TRL's values (fails when TRL changes a default)."""
    trl = pytest.importorskip("trl", reason='the "hf" extra is not installed')
    theirs = {f.name: f.default for f in dataclasses.fields(trl.GRPOConfig)}
    ours = GRPOSettings()
    for name in ("loss_type", "beta", "epsilon", "epsilon_high", "num_iterations", "temperature"):
        assert getattr(ours, name) == theirs[name], name

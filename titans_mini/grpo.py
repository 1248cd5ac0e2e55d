"""GRPO, Group Relative Policy Optimization, for any causal LM (DeepSeekMath, arXiv 2402.03300).

For every prompt q we sample a group of G completions o_1..o_G from the old policy,
score each with a verifiable reward r_i and use the group itself as the baseline:
no critic, no value function. The objective (eq. 3) is

    J(theta) = 1/G sum_i 1/|o_i| sum_t { min(rho_it A_i, clip(rho_it, 1-eps, 1+eps) A_i)
                                          - beta KL_it }
    rho_it   = pi_theta(o_it | q, o_i,<t) / pi_old(o_it | q, o_i,<t)

and we minimise loss = -J. Conventions (advantage epsilon, k3 KL, the three loss
aggregations, asymmetric clipping) follow TRL's GRPOTrainer (trl 1.16).

A "model" is any nn.Module mapping token ids (batch, time) to logits
(batch, time, vocab), returned as a tensor, as a tuple whose first element is the
logits (TitansLM returns (logits, state)), or as an object with `.logits` (Hugging Face).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from einops import rearrange
from torch import Tensor, nn

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
RewardFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass
class GRPOSettings:
    """Hyper-parameters of one GRPO run (named to avoid confusion with TRL's GRPOConfig).

    Defaults follow TRL except `lr` (TRL: 1e-6 for billion-parameter models; tiny
    from-scratch models need ~1e-3) and `max_new_tokens` (TRL: 512).
    """

    group_size: int = 8  # G completions per prompt (TRL: num_generations)
    temperature: float = 1.0
    max_new_tokens: int = 16  # TRL: max_completion_length
    eos_id: int | None = None  # stop token; None = always generate max_new_tokens
    epsilon: float = 0.2  # lower clip: rho >= 1 - epsilon
    epsilon_high: float | None = None  # upper clip: rho <= 1 + epsilon_high (None = epsilon)
    beta: float = 0.0  # KL coefficient; 0 skips the reference model entirely
    loss_type: str = "dapo"
    num_iterations: int = 1  # optimiser steps per batch of samples (mu in the paper)
    lr: float = 1e-3
    advantage_eps: float = 1e-4  # A = (r - mean) / (std + advantage_eps)
    max_grad_norm: float | None = 1.0  # None = no gradient clipping

    def __post_init__(self) -> None:
        def check(ok: bool, field: str, expected: str) -> None:
            if not ok:
                raise ValueError(f"GRPOSettings.{field} must be {expected}, got {getattr(self, field)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        check(is_int(self.group_size) and self.group_size >= 2, "group_size", "an int >= 2 (std needs 2 samples)")
        check(self.temperature > 0, "temperature", "> 0")
        check(is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens", "an int >= 1")
        check(self.eos_id is None or (is_int(self.eos_id) and self.eos_id >= 0), "eos_id", "None or an int >= 0")
        check(0 < self.epsilon < 1, "epsilon", "in (0, 1)")
        check(self.epsilon_high is None or self.epsilon_high > 0, "epsilon_high", "None or > 0")
        check(self.beta >= 0, "beta", ">= 0")
        check(self.loss_type in LOSS_TYPES, "loss_type", f"one of {LOSS_TYPES}")
        check(is_int(self.num_iterations) and self.num_iterations >= 1, "num_iterations", "an int >= 1")
        check(self.lr > 0, "lr", "> 0")
        check(self.advantage_eps >= 0, "advantage_eps", ">= 0")
        check(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "None or > 0")


def logits_of(output: Any) -> Tensor:
    """The logits of a model's output: a tensor, a tuple (logits, ...) or an object with .logits."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    if isinstance(getattr(output, "logits", None), Tensor):
        return output.logits
    raise TypeError(f"model output must be logits, a tuple (logits, ...) or have .logits; got {type(output).__name__}")


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` where `mask` is 1 (over everything, or along `dim`); 0 where nothing is active."""
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1)


def token_log_probs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature)[token] in float32: logits (..., V), tokens (...) -> (...)."""
    return (logits.float() / temperature).log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)


def _check_ids(name: str, ids: Tensor) -> None:
    if not isinstance(ids, Tensor) or ids.dtype != torch.long or ids.ndim != 2 or ids.numel() == 0:
        raise ValueError(f"{name} must be a non-empty (batch, time) LongTensor, got {getattr(ids, 'shape', ids)}")


@torch.no_grad()
def sample_completions(
    model: nn.Module,
    prompts: Tensor,
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sample `group_size` completions per prompt, o_t ~ softmax(logits / temperature).

    prompts: (P, Lp). Returns, each of shape (P*G, T) with T <= max_new_tokens and the
    G completions of prompt p in rows p*G .. p*G+G-1:
      completions (long): tokens after an eos are padding (filled with eos_id);
      log_probs (float32): log pi_old(o_t | q, o_<t) of the sampling policy, 0 on padding;
      mask (float32): 1 on real tokens (the eos included), 0 on padding.
    Every step re-runs the full forward (no cache): simple, and right for short completions.
    `generator` (for reproducibility) must live on the prompts' device.
    """
    _check_ids("prompts", prompts)
    if group_size < 1 or max_new_tokens < 1 or temperature <= 0:
        raise ValueError(
            "need group_size >= 1, max_new_tokens >= 1, temperature > 0; "
            f"got {group_size}, {max_new_tokens}, {temperature}"
        )
    seq = prompts.repeat_interleave(group_size, dim=0)
    done = torch.zeros(seq.shape[0], dtype=torch.bool, device=seq.device)
    log_probs, masks = [], []
    for _ in range(max_new_tokens):
        logits = logits_of(model(seq))[:, -1]
        token = torch.multinomial((logits.float() / temperature).softmax(-1), 1, generator=generator).squeeze(-1)
        if eos_id is not None:
            token = token.masked_fill(done, eos_id)
        masks.append((~done).float())
        log_probs.append(token_log_probs(logits, token, temperature) * masks[-1])
        seq = torch.cat([seq, token[:, None]], dim=1)
        if eos_id is not None:
            done |= token == eos_id
            if done.all():
                break
    return seq[:, prompts.shape[1]:], torch.stack(log_probs, 1), torch.stack(masks, 1)


def completion_log_probs(model: nn.Module, prompts: Tensor, completions: Tensor, temperature: float = 1.0) -> Tensor:
    """log pi(o_t | q, o_<t) = log_softmax(logits / temperature)[o_t], in float32: shape (B, T).

    prompts (B, Lp) and completions (B, T) row-aligned. One forward over q ++ o[:-1];
    the logit at position Lp-1+t predicts o_t. Used alike for the old, current and
    reference policies (gradients flow unless the caller wraps it in no_grad).
    """
    _check_ids("prompts", prompts)
    _check_ids("completions", completions)
    if prompts.shape[0] != completions.shape[0]:
        raise ValueError(
            f"prompts and completions need the same batch, got {prompts.shape[0]} and {completions.shape[0]}"
        )
    seq = torch.cat([prompts, completions], dim=1)
    logits = logits_of(model(seq[:, :-1]))[:, prompts.shape[1] - 1 :]
    return token_log_probs(logits, completions, temperature)


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """A_i = (r_i - mean(r_group)) / (std(r_group) + eps), std with Bessel's correction.

    DeepSeekMath sec. 4.1.2 (outcome supervision; paper: plain std, no eps); eps as TRL.
    rewards: (P*G,) grouped as sample_completions returns them. Equal rewards -> A = 0.
    """
    if rewards.ndim != 1 or group_size < 2 or rewards.shape[0] % group_size:
        raise ValueError(
            f"rewards must be 1-D, length divisible by group_size >= 2; got {tuple(rewards.shape)}, {group_size}"
        )
    r = rearrange(rewards.float(), "(p g) -> p g", g=group_size)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)
    return rearrange(adv, "p g -> (p g)")


def clipped_surrogate(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, epsilon: float, epsilon_high: float | None = None
) -> tuple[Tensor, Tensor]:
    """Per-token loss -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A), rho = exp(logp - old_logp).

    eq. 3 with the asymmetric clip of DAPO / TRL (eps_high = eps_low when None).
    Also returns where the clipped branch is taken, as TRL counts it:
    (rho < 1-eps_low and A < 0) or (rho > 1+eps_high and A > 0); there the gradient is 0.
    """
    eps_high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + eps_high) * adv
    is_clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    return -torch.minimum(unclipped, clipped), is_clipped


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token KL(pi_theta || pi_ref) estimate, eq. 4 ("k3"): pi_ref/pi - log(pi_ref/pi) - 1 >= 0."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def aggregate(token_loss: Tensor, mask: Tensor, loss_type: str, max_completion_length: int | None = None) -> Tensor:
    """Reduce a (B, T) per-token loss to a scalar over the mask's active tokens (TRL's loss types).

      grpo:    1/B sum_i (sum_t m_it l_it / sum_t m_it)     (eq. 3; long outputs weigh less per token)
      dr_grpo: sum_it m_it l_it / (B * max_completion_length)  (Dr. GRPO, a constant normaliser)
      dapo:    sum_it m_it l_it / sum_it m_it               (DAPO, every token weighs the same)
    """
    if loss_type == "grpo":
        return masked_mean(token_loss, mask, dim=1).mean()
    if loss_type == "dr_grpo":
        length = token_loss.shape[1] if max_completion_length is None else max_completion_length
        return (token_loss * mask.to(token_loss.dtype)).sum() / (token_loss.shape[0] * length)
    if loss_type == "dapo":
        return masked_mean(token_loss, mask)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    settings: GRPOSettings,
    ref_logp: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """loss = aggregate(-min(rho A, clip(rho) A) + beta * k3_kl) = -J of eq. 3, plus statistics.

    Stats over active tokens: kl (nan when ref_logp is None), clip_fraction, ratio_dev = mean |rho - 1|.
    """
    token_loss, is_clipped = clipped_surrogate(logp, old_logp, advantages, settings.epsilon, settings.epsilon_high)
    kl_mean = math.nan
    if ref_logp is not None:
        kl = k3_kl(logp, ref_logp)
        token_loss = token_loss + settings.beta * kl
        kl_mean = masked_mean(kl, mask).item()
    loss = aggregate(token_loss, mask, settings.loss_type, settings.max_new_tokens)
    with torch.no_grad():
        stats = {
            "kl": kl_mean,
            "clip_fraction": masked_mean(is_clipped.to(logp.dtype), mask).item(),
            "ratio_dev": masked_mean(((logp - old_logp).exp() - 1).abs(), mask).item(),
        }
    return loss, stats


def grpo_step(
    policy: nn.Module,
    ref_policy: nn.Module | None,
    optimizer: torch.optim.Optimizer,
    prompts: Tensor,
    reward_fn: RewardFn,
    settings: GRPOSettings,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """One GRPO update: sample G completions per prompt, score, then num_iterations optimiser steps.

    reward_fn(prompts, completions, mask) -> (P*G,) float rewards, where `prompts` is
    repeated to row-align with the completions (P*G, Lp). The old policy's log-probs
    are computed once; every iteration reuses the same samples against them, so rho = 1
    on the first iteration. Returns floats: reward_mean, reward_std (mean within-group
    std, as TRL logs it), zero_std_frac (fraction of groups whose rewards are all equal:
    they give no gradient), completion_length (active tokens), and the means over the
    iterations of loss, kl, clip_fraction, ratio_dev and grad_norm (before clipping).
    """
    if settings.beta > 0 and ref_policy is None:
        raise ValueError("ref_policy is required when settings.beta > 0")
    s, G = settings, settings.group_size
    completions, _, mask = sample_completions(
        policy, prompts, G, s.max_new_tokens, s.temperature, s.eos_id, generator
    )
    prompts_g = prompts.repeat_interleave(G, dim=0)
    rewards = reward_fn(prompts_g, completions, mask)
    if not isinstance(rewards, Tensor) or rewards.shape != (completions.shape[0],):
        got = getattr(rewards, "shape", rewards)
        raise ValueError(f"reward_fn must return a ({completions.shape[0]},) tensor, got {got}")
    rewards = rewards.float().to(completions.device)
    advantages = group_advantages(rewards, G, s.advantage_eps)
    with torch.no_grad():
        old_logp = completion_log_probs(policy, prompts_g, completions, s.temperature)
        ref_logp = None
        if s.beta > 0:
            ref_logp = completion_log_probs(ref_policy, prompts_g, completions, s.temperature)

    history: list[dict[str, float]] = []
    for _ in range(s.num_iterations):
        logp = completion_log_probs(policy, prompts_g, completions, s.temperature)
        loss, stats = grpo_loss(logp, old_logp, advantages, mask, s, ref_logp)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = math.inf if s.max_grad_norm is None else s.max_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_norm)
        optimizer.step()
        history.append({"loss": loss.item(), "grad_norm": grad_norm.item(), **stats})

    groups = rearrange(rewards, "(p g) -> p g", g=G)
    return {
        "reward_mean": rewards.mean().item(),
        "reward_std": groups.std(1).mean().item(),
        "zero_std_frac": (groups.max(1).values == groups.min(1).values).float().mean().item(),
        "completion_length": mask.sum(1).mean().item(),
        **{k: sum(h[k] for h in history) / len(history) for k in history[0]},
    }


def make_optimizer(policy: nn.Module, settings: GRPOSettings) -> torch.optim.Optimizer:
    """AdamW at settings.lr without weight decay (TRL's default optimiser, weight_decay=0)."""
    return torch.optim.AdamW(policy.parameters(), lr=settings.lr, weight_decay=0.0)

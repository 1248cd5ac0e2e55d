"""GRPO on a toy verifiable task: a tiny causal LM learns to copy a short digit string.

Prompt: K random digits then SEP, e.g. `3 1 4 1 |`. Completion: K tokens. Reward: the
fraction of positions where the completion copies the prompt (chance ~ 1/9). The
policy starts from random weights: no pre-training, only GRPO.

Part 1 trains with sensible settings and prints the reward before and after.
Part 2 shows the classic collapse: a far too high learning rate makes each group's
G completions identical, every group's rewards equal (zero std), the advantages vanish
and learning stops on a wrong answer. zero_std_frac -> 1 also happens on success
(every completion right): read it together with the reward.

    python -m benchmarks.grpo_toy      # from the repo root; ~10 s on 1 CPU thread
"""

import argparse
import time
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from titans_mini.grpo import GRPOSettings, grpo_step, make_optimizer, sample_completions

DIGITS, K = 8, 4  # tokens 0..7 are digits
SEP = DIGITS  # token 8 ends the prompt
VOCAB = DIGITS + 1


class WindowPolicy(nn.Module):
    """A causal LM that sees the last `window` tokens: logits_t = MLP(sum_k E_k[x_{t-k}]).

    Each slot k (0 = the current token) has its own embedding table, so "copy the token
    K positions back" is one linear map: the right inductive bias for a 1-second demo.
    """

    def __init__(self, vocab: int = VOCAB, window: int = K + 1, dim: int = 64):
        super().__init__()
        self.vocab, self.window = vocab, window
        self.slots = nn.Embedding(window * (vocab + 1), dim)  # +1: a "before the start" token
        self.mlp = nn.Sequential(nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, vocab))

    def forward(self, ids: Tensor) -> Tensor:
        padded = F.pad(ids, (self.window - 1, 0), value=self.vocab)
        recent = padded.unfold(1, self.window, 1).flip(-1)  # (B, T, window), slot 0 = x_t
        slot = torch.arange(self.window, device=ids.device) * (self.vocab + 1)
        return self.mlp(self.slots(recent + slot).sum(2))


def make_prompts(n: int, gen: torch.Generator) -> Tensor:
    digits = torch.randint(0, DIGITS, (n, K), generator=gen)
    return torch.cat([digits, torch.full((n, 1), SEP)], dim=1)


def copy_reward(prompts: Tensor, completions: Tensor, mask: Tensor) -> Tensor:
    """Fraction of the K positions where completion == prompt digits (verifiable, no model)."""
    return (completions[:, :K] == prompts[:, :K]).float().mean(1)


def evaluate(policy: nn.Module, gen: torch.Generator, n: int = 512) -> tuple[float, float]:
    """(mean sampled reward at temperature 1, exact-copy rate of greedy decoding) on fresh prompts."""
    prompts = make_prompts(n, gen)
    sampled, _, mask = sample_completions(policy, prompts, 1, K, generator=gen)
    greedy, _, _ = sample_completions(policy, prompts, 1, K, temperature=1e-6, generator=gen)
    exact = (copy_reward(prompts, greedy, mask) == 1).float()
    return copy_reward(prompts, sampled, mask).mean().item(), exact.mean().item()


def train(settings: GRPOSettings, steps: int, prompts_per_step: int, log_every: int,
          seed: int = 0) -> tuple[float, float, dict]:
    """Train a fresh policy with GRPO; returns the sampled reward before and after, and the last step's metrics."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    policy = WindowPolicy()
    optimizer = make_optimizer(policy, settings)
    before = evaluate(policy, torch.Generator().manual_seed(1234))
    print(f"  before: sampled reward {before[0]:.3f}, greedy exact copy {before[1]:.3f}")
    print("  step  reward  zero_std_frac  clip_frac  ratio_dev  grad_norm     loss")
    for step in range(1, steps + 1):
        m = grpo_step(policy, None, optimizer, make_prompts(prompts_per_step, gen), copy_reward, settings, gen)
        if step % log_every == 0 or step == 1:
            print(f"  {step:4d}  {m['reward_mean']:.3f}  {m['zero_std_frac']:13.3f}  {m['clip_fraction']:9.3f}"
                  f"  {m['ratio_dev']:9.4f}  {m['grad_norm']:9.4f}  {m['loss']:+.4f}")
    after = evaluate(policy, torch.Generator().manual_seed(1234))
    print(f"  after:  sampled reward {after[0]:.3f}, greedy exact copy {after[1]:.3f}")
    return before[0], after[0], m


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args(argv)  # --help, nothing to set
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    print(f"Part 1: copy {K} digits, G=8, 16 prompts/step, lr=3e-3, 2 iterations per batch (rho != 1 on the 2nd)")
    good = GRPOSettings(group_size=8, max_new_tokens=K, lr=3e-3, num_iterations=2, loss_type="dapo")
    before, after, _ = train(good, steps=150, prompts_per_step=16, log_every=25)
    t1 = time.perf_counter()
    print(f"  time {t1 - t0:.1f} s\n")

    print("Part 2: collapse, the same run with lr=0.1 (30x too high)")
    _, collapsed, last = train(replace(good, lr=0.1), steps=60, prompts_per_step=16, log_every=10)
    print(f"  time {time.perf_counter() - t1:.1f} s")
    print("zero_std_frac -> 1 at a low reward: each group's completions are identical, every advantage"
          " is 0, the gradient vanishes and the reward stays where the collapse left it.")
    print(f"summary reward_before={before:.3f} reward_after={after:.3f} collapse_reward={collapsed:.3f} "
          f"collapse_zero_std_frac={last['zero_std_frac']:.2f}")


if __name__ == "__main__":
    main()

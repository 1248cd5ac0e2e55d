"""GRPO on the passkey recall task: pre-train a TitansLM briefly, measure, fine-tune, measure.

Shared by notebook 06 and `benchmarks/grpo_recall.py`. A prompt is
`<bos> <key> k v f ... f <query> k` (`tasks.passkey_prompts`): the value v sits at
position 3, the question `<query> k` `distance` tokens after it, and the next token
should be v (chance: 1/64). With `distance` beyond the attention window the value can
come only through the long-term memory.

    setup = RecallSetup()                      # the defaults are the reported run
    steps = pretrain(model, setup, seed=0)     # supervised, stopped early at `stop_at`
    before = recall_accuracy(model, *prompt_set(512, setup.distance, TEST_SEED, device))
    history = grpo_finetune(model, setup, seed=0)   # reward 1 iff the answer is right
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..checks import check_int
from ..config import TitansConfig
from ..grpo import GRPOSettings, grpo_step, make_optimizer
from .tasks import passkey_batch, passkey_prompts, recall_reward
from .training import supervised_step

TEST_SEED, VALIDATION_SEED = 1234, 4321  # held-out prompt sets, the same for every model seed


@dataclass(frozen=True)
class RecallSetup:
    """Everything one pre-train + GRPO run depends on.

    Defaults: MAC with a 16-token segment, the question 32 tokens after the value
    (2x the segment), pre-training stopped once the expected sampled accuracy reaches
    0.2, then 40 GRPO steps of 16 prompts x G=8 one-token answers.
    """

    model: TitansConfig = TitansConfig(dim=64, n_layers=2, window=16, chunk_size=8, variant="mac")
    distance: int = 32  # value -> question, in tokens
    warmup_distance: int = 8  # inside the window: attention alone learns the read-out
    warmup_steps: int = 100
    batch_size: int = 32
    check_every: int = 5  # supervised steps between two validation checks
    max_pretrain_steps: int = 400
    pretrain_lr: float = 3e-3
    stop_at: float = 0.2  # stop pre-training once the validation expected accuracy reaches it
    grpo: GRPOSettings = field(default_factory=lambda: GRPOSettings(group_size=8, max_new_tokens=1, lr=1e-3))
    grpo_steps: int = 40
    prompts_per_step: int = 16
    eval_prompts: int = 512
    eval_samples: int = 4  # sampled answers per held-out prompt

    def __post_init__(self) -> None:
        if not isinstance(self.model, TitansConfig) or not isinstance(self.grpo, GRPOSettings):
            raise TypeError("RecallSetup.model must be a TitansConfig and RecallSetup.grpo a GRPOSettings")
        for name in ("distance", "warmup_distance", "batch_size", "check_every", "max_pretrain_steps",
                     "prompts_per_step", "eval_prompts", "eval_samples"):
            check_int(f"RecallSetup.{name}", getattr(self, name), 1)
        for name in ("warmup_steps", "grpo_steps"):
            check_int(f"RecallSetup.{name}", getattr(self, name), 0)
        if not 0 < self.stop_at <= 1 or self.pretrain_lr <= 0:
            raise ValueError(f"RecallSetup needs 0 < stop_at <= 1 and pretrain_lr > 0, "
                             f"got {self.stop_at!r}, {self.pretrain_lr!r}")


def prompt_set(n: int, distance: int, seed: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """`n` fixed passkey prompts (n, distance + 5) and their answers (n,), drawn from `seed`."""
    batch = passkey_prompts(n, distance, generator=torch.Generator().manual_seed(seed))
    return batch["prompt_ids"].to(device), batch["answers"].to(device)


@torch.no_grad()
def recall_accuracy(model: nn.Module, prompts: Tensor, answers: Tensor, samples: int = 4,
                    seed: int = 0) -> dict[str, float]:
    """Accuracy of the answer token three ways: "sampled" at temperature 1 (`samples`
    draws per prompt, what GRPO's reward sees), "expected" (its expectation: the mean
    probability of the right value) and "greedy" (argmax).

    The answer is one token, so drawing from the last position's softmax is exactly what
    `grpo.sample_completions` does, without repeating the forward per sample.
    """
    was_training = model.training
    model.eval()
    probs = model(prompts)[0][:, -1].float().softmax(-1)
    model.train(was_training)
    generator = torch.Generator(device=prompts.device).manual_seed(seed)
    drawn = torch.multinomial(probs, samples, replacement=True, generator=generator)
    return {
        "sampled": (drawn == answers[:, None]).float().mean().item(),
        "expected": probs.gather(1, answers[:, None]).mean().item(),
        "greedy": (probs.argmax(-1) == answers).float().mean().item(),
    }


def pretrain(model: nn.Module, setup: RecallSetup, seed: int, progress: bool = False) -> int:
    """Supervised pre-training, stopped early; returns the number of steps taken.

    Cross-entropy at the answer only (`training.supervised_step`), AdamW at a constant
    learning rate, batches of `passkey_batch` with the value at position 3, as in the
    prompts. A curriculum: the first `warmup_steps` at `warmup_distance` (inside the
    window, where attention learns to read a value out), then alternating steps at
    `warmup_distance` and `distance` (where only the memory can help; trained straight
    at `distance`, MAC stayed at chance for 300+ steps in our runs). After the warm-up,
    every `check_every` steps: stop once the expected sampled accuracy at `distance`
    on validation prompts (not the test prompts) reaches `stop_at`.
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=setup.pretrain_lr, weight_decay=0.0)
    validation = prompt_set(256, setup.distance, VALIDATION_SEED, device)
    bar = tqdm(total=setup.max_pretrain_steps, desc="pre-train", leave=False, disable=not progress)
    model.train()
    for step in range(1, setup.max_pretrain_steps + 1):
        warming = step <= setup.warmup_steps
        distance = setup.warmup_distance if warming or step % 2 else setup.distance
        batch = passkey_batch(setup.batch_size, distance, generator=generator)
        supervised_step(model, optimizer, batch, device)
        bar.update()
        if not warming and step % setup.check_every == 0:
            expected = recall_accuracy(model, *validation)["expected"]
            bar.set_postfix(expected=f"{expected:.3f}")
            if expected >= setup.stop_at:
                break
    bar.close()
    model.eval()
    return step


def grpo_finetune(model: nn.Module, setup: RecallSetup, seed: int, log_every: int = 0,
                  progress: bool = False) -> list[dict[str, float]]:
    """`setup.grpo_steps` GRPO steps on fresh training prompts at `setup.distance`.

    G one-token completions per prompt, reward 1 when the token is the passkey's value
    (`tasks.recall_reward`). With `setup.grpo.beta > 0` the reference policy is a frozen
    copy of `model` as it is now. Returns each step's `grpo_step` metrics; `log_every`
    > 0 prints some of them every that many steps.
    """
    device = next(model.parameters()).device
    data = torch.Generator().manual_seed(seed)
    sampler = torch.Generator(device=device).manual_seed(seed)
    optimizer = make_optimizer(model, setup.grpo)
    ref = copy.deepcopy(model).requires_grad_(False) if setup.grpo.beta > 0 else None
    G = setup.grpo.group_size
    history = []
    for step in tqdm(range(1, setup.grpo_steps + 1), desc="GRPO", leave=False, disable=not progress):
        batch = passkey_prompts(setup.prompts_per_step, setup.distance, generator=data)
        answers = batch["answers"].to(device).repeat_interleave(G)  # row-aligned with the completions

        def reward(prompts: Tensor, completions: Tensor, mask: Tensor) -> Tensor:
            return recall_reward(completions, answers, mask)

        metrics = grpo_step(model, ref, optimizer, batch["prompt_ids"].to(device), reward, setup.grpo, sampler)
        history.append(metrics)
        if log_every and (step % log_every == 0 or step == 1):
            print(f"  step {step:3d}  reward {metrics['reward_mean']:.3f}  zero_std_frac "
                  f"{metrics['zero_std_frac']:.2f}  grad_norm {metrics['grad_norm']:.3f}", flush=True)
    model.eval()
    return history

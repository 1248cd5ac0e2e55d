"""Supervised training and evaluation on the passkey task: shared by notebook 05, the
experiment script `benchmarks/passkey.py` and GRPO's pre-training (notebook 06).

The loss is cross-entropy at the answer position only (`tasks.IGNORE` elsewhere), so
the model is graded on recall alone, not on predicting the random filler.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..checks import check_int
from .tasks import IGNORE, answer_accuracy, passkey_batch, passkey_length


@torch.no_grad()
def stream(model: nn.Module, ids: torch.Tensor, piece: int = 1024, state=None) -> tuple[torch.Tensor, object]:
    """Feed `ids` (B, T) to `model` in pieces of `piece` tokens from `state` (None: a new stream),
    the state passed on, without gradients: the last piece's logits and the final state (the
    same as one pass over all of `ids`; the activations of one piece at a time)."""
    for part in ids.split(piece, dim=1):
        logits, state = model(part, state)
    return logits, state


def passkey_loss(model: nn.Module, batch: dict[str, torch.Tensor],
                 backprop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy at answer positions, and the answer accuracy of the same forward.

    `backprop`: rows longer than this are read in two parts, the last `backprop` tokens (which
    must hold every answer) with gradients, everything before them streamed without
    (`stream`): truncated backpropagation through time. A 16k-token row then costs a forward
    pass over 16k tokens and a backward pass over `backprop`; the gradient still reaches how
    the gates treat the haystack inside the last part (the needle's trace in the carried state
    must survive it), not how the needle was written.
    """
    ids, targets, state = batch["input_ids"], batch["targets"], None
    if backprop is not None and ids.shape[1] > backprop:
        cut = ids.shape[1] - backprop
        if (targets[:, :cut] != IGNORE).any():
            raise ValueError(f"backprop={backprop}: every answer must be in the last {backprop} tokens of a row")
        _, state = stream(model, ids[:, :cut])
        ids, targets = ids[:, cut:], targets[:, cut:]
    logits, _ = model(ids, state)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)
    return loss, answer_accuracy(logits, targets)


def supervised_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
                    device: torch.device | str, backprop: int | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One AdamW step on `passkey_loss`, gradients clipped to norm 1. A step whose gradient
    is not finite is skipped (as mixed-precision training does): an inner-loop overflow
    anywhere would otherwise poison every weight. `backprop` as in `passkey_loss`. Returns loss, accuracy, skipped."""
    loss, accuracy = passkey_loss(model, {k: v.to(device) for k, v in batch.items()}, backprop)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    skipped = not torch.isfinite(nn.utils.clip_grad_norm_(model.parameters(), 1.0)).item()
    if not skipped:
        optimizer.step()
    return loss, accuracy, skipped


def curriculum_distance(step: int, steps: int, distances: tuple[int, int], curriculum: float,
                        generator: torch.Generator) -> int:
    """The needle distance of one training step: uniform in [low, top], where `top` grows
    geometrically from 4 (or `low`, if larger; at most `high`) to `high` over the first `curriculum` fraction of the
    steps (curriculum 0: top = high from the start)."""
    low, high = distances
    if curriculum > 0:
        start = min(max(low, 4), high)
        top = round(start * (high / start) ** min(1.0, step / (curriculum * steps)))
    else:
        top = high
    return int(torch.randint(low, max(low, top) + 1, (1,), generator=generator))


def pairs_at(distance: int, distractors: int) -> int:
    """Key/value pairs in a passkey row: the needle plus up to `distractors` other pairs,
    as many as fit between needle and question (each takes 3 tokens)."""
    return 1 + min(distractors, (distance - 1) // 3)


def train_passkey(model: nn.Module, steps: int, *, distances: tuple[int, int], seq_len: int,
                  batch_size: int = 32, lr: float = 3e-3, curriculum: float = 0.0, distractors: int = 0,
                  seed: int = 0, progress: bool = True, backprop: int | None = None,
                  device: torch.device | str | None = None) -> list[dict[str, float]]:
    """Train `model` on passkey batches with AdamW and a one-cycle learning rate.

    Each step draws a distance (`curriculum_distance`) and a batch of rows of length
    `seq_len - (distances[1] - distance)`: the haystack around the needle keeps the same
    slack, so short distances make short, cheap rows. Why a curriculum: recall is learned
    after a plateau at chance, and the plateau is long when every row is long. A model
    that first finds the needle at short distances escapes it sooner (in our runs MAC,
    MAG and MAL stayed at chance for 300+ steps on distances 2..64 from the start).
    `distractors` > 0 puts other `<key> k' v'` pairs between needle and question
    (`pairs_at`): the memory must then recall by key, not just the last value it saw.
    `backprop`: gradients through the last `backprop` tokens of a row only (`passkey_loss`), so
    rows far longer than fit in memory with their activations can be trained on.
    Non-finite steps are skipped (`supervised_step`). Returns per-step loss, accuracy, distance and whether the step was skipped.
    """
    low, high = distances
    if not 1 <= low <= high or seq_len < passkey_length(high):
        raise ValueError(f"need 1 <= distances[0] <= distances[1] and seq_len >= passkey_length(distances[1]), "
                         f"got distances={distances}, seq_len={seq_len}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if backprop is not None:
        # the answer is at most (slack + 2) tokens from a row's end, slack = seq_len - passkey_length(high)
        check_int("backprop", backprop, seq_len - passkey_length(high) + 2)
    if not 0 <= curriculum <= 1:
        raise ValueError(f"curriculum must be a fraction of the steps in [0, 1], got {curriculum}")
    device = device or next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    # one cycle: warm up over 10% of the steps, then anneal; a run of 10 steps or fewer (a smoke
    # test) keeps the learning rate constant: OneCycleLR divides by zero on some short lengths
    schedule = (torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
                if steps > 10 else torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0))
    model.train()
    history = []
    for step in tqdm(range(steps), disable=not progress, desc="train", leave=False):
        distance = curriculum_distance(step, steps, distances, curriculum, generator)
        batch = passkey_batch(batch_size, distance, seq_len=seq_len - (high - distance),
                              n_pairs=pairs_at(distance, distractors), generator=generator)
        loss, accuracy, skipped = supervised_step(model, optimizer, batch, device, backprop)
        schedule.step()
        history.append({"loss": loss.item(), "accuracy": accuracy.item(), "distance": distance, "skipped": skipped})
    model.eval()
    return history


@torch.no_grad()
def passkey_accuracy(model: nn.Module, distance: int, *, seq_len: int, n: int = 256, seed: int = 1234,
                     distractors: int = 0, device: torch.device | str | None = None) -> float:
    """Greedy answer accuracy on `n` fresh passkey rows at `distance` (chance: 1/64),
    with `pairs_at(distance, distractors)` key/value pairs per row."""
    device = device or next(model.parameters()).device
    batch = passkey_batch(n, distance, seq_len=seq_len, n_pairs=pairs_at(distance, distractors),
                          generator=torch.Generator().manual_seed(seed))
    logits, _ = model(batch["input_ids"].to(device))
    return answer_accuracy(logits, batch["targets"].to(device)).item()

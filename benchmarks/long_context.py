"""Passkey recall far beyond the training length: how long does the memory hold a needle?

    python -m benchmarks.long_context --quick     # the shipped MAC model, 32 prompts a distance, ~1 min
    python -m benchmarks.long_context             # 256 prompts a distance

The shipped model (`titans_mini/assets/passkey_model.pt`: MAC, window 16, 2 layers, trained on
distances up to 64) reads each prompt streamed in pieces of 1,024 tokens with its state
passed on, at needle distances from 64 to 16,384 tokens (1,024x its window). Then:

- recall accuracy at each distance (greedy, chance 1/64);
- why it decays: the forgetting gate alpha_t of each memory layer, read along the haystack
  (`long_context.gate_trace`), and the share of a write it leaves after each distance,
  prod (1 - alpha_t) (`long_context.survival`);
- cost: milliseconds per new token after a context of 1k to 16k tokens, and the size of the
  state, which does not grow.

The last line is `summary niah_best_16k=<accuracy> variant=<name> swa_16k=<accuracy or na>
full_attention_16k=<accuracy or na>`: models other than the shipped one are not trained yet
(na). Nothing here trains.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from titans_mini.checkpoint import ASSETS, load_checkpoint
from titans_mini.recall.long_context import gate_trace, streamed_recall, survival
from titans_mini.recall.tasks import passkey_prompts

DISTANCES = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
COST_CONTEXTS = (1024, 4096, 16384)


def count_numbers(x) -> int:
    """Elements of every tensor in a (nested) state."""
    if isinstance(x, torch.Tensor):
        return x.numel()
    if dataclasses.is_dataclass(x):
        return sum(count_numbers(getattr(x, f.name)) for f in dataclasses.fields(x))
    if isinstance(x, (list, tuple)):
        return sum(count_numbers(v) for v in x)
    return 0


@torch.no_grad()
def cost_per_token(model, context: int, new_tokens: int = 64) -> tuple[float, int]:
    """(ms per new token after `context` tokens, numbers in the state): one prompt streamed in
    pieces, then `new_tokens` single-token steps timed."""
    ids = passkey_prompts(1, context, generator=torch.Generator().manual_seed(0))["prompt_ids"]
    state = None
    for part in ids.split(1024, dim=1):
        logits, state = model(part, state)
    token = logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        logits, state = model(token, state)
        token = logits[:, -1:].argmax(-1)
    return 1e3 * (time.perf_counter() - start) / new_tokens, count_numbers(state)


def main(argv: list[str] | None = None) -> dict[int, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="32 prompts a distance instead of 256 (about a minute)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--distances", type=int, nargs="+", default=list(DISTANCES), help="needle distances")
    parser.add_argument("--contexts", type=int, nargs="+", default=list(COST_CONTEXTS),
                        help="context lengths for the cost per token")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n = 32 if args.quick else 256
    model, info = load_checkpoint(ASSETS / "passkey_model.pt")
    print(f"shipped model: {model.config.variant}, window {model.config.window}, {model.config.n_layers} layers, "
          f"{model.num_parameters():,} parameters, trained {info}; {n} prompts a distance, chance 1/64 = 0.016")

    start, accuracy = time.perf_counter(), {}
    for distance in args.distances:
        accuracy[distance] = streamed_recall(model, distance, n=n)
        print(f"distance {distance:6,d} ({distance // model.config.window:5,d}x the window): "
              f"accuracy {accuracy[distance]:.3f}", flush=True)
    print(f"({time.perf_counter() - start:.0f} s)")

    ids = passkey_prompts(4, max(args.distances), generator=torch.Generator().manual_seed(1))["prompt_ids"]
    trace = gate_trace(model, ids)
    needle = 3  # the value's position; the question comes `distance` tokens later
    print("\nforgetting along the haystack: mean alpha_t per memory layer, and the share of the needle's write "
          "that forgetting leaves at the question, prod(1 - alpha) over the distance")
    print(f"{'layer':>5} {'alpha':>8}" + "".join(f"{d:>9,d}" for d in args.distances))
    for layer, gates in enumerate(trace):
        alpha = gates["alpha"][:, needle + 1:]
        kept = [survival(alpha[:, :d]).mean().item() for d in args.distances]
        print(f"{layer:5d} {alpha.mean().item():8.4f}" + "".join(f"{k:9.1e}" for k in kept))

    print("\ncost of one new token after a context (streamed, one prompt)")
    for context in args.contexts:
        ms, numbers = cost_per_token(model, context)
        print(f"context {context:6,d}: {ms:.2f} ms per token, state {numbers:,} numbers")

    at_16k = f"{accuracy[16384]:.3f}" if 16384 in accuracy else "na"
    print(f"summary niah_best_16k={at_16k} variant={model.config.variant} swa_16k=na full_attention_16k=na")
    return accuracy


if __name__ == "__main__":
    main()

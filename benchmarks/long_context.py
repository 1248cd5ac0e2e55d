"""Passkey recall far beyond the training length: how long does the memory hold a needle?

    python -m benchmarks.long_context --quick     # the shipped long-context model, 32 prompts a distance
    python -m benchmarks.long_context --model titans_mini/assets/passkey_model.pt --quick  # trained to 64 only
    python -m benchmarks.long_context --model titans_mini/assets/passkey_model.pt --threads 1 \
        --finetune 400:1024 300:4096 --save long.pt   # makes the shipped long-context model again (45 min)

Two shipped MAC models (window 16, 2 layers, 187 k parameters): `passkey_model.pt`, trained on
distances up to 64, and `long_context_model.pt`, the same trained further on distances up to
1,024, then 4,096 (the last command). Each prompt is streamed in pieces of 1,024 tokens with
the state passed on, at needle distances from 64 to 16,384 tokens (1,024x the window). Then:

- recall accuracy at each distance (greedy, chance 1/64);
- why it decays: the forgetting gate alpha_t of each memory layer, read along the haystack
  (`long_context.gate_trace`), and the share of a write it leaves after each distance,
  prod (1 - alpha_t) (`long_context.survival`);
- cost: milliseconds per new token after a context of 1k to 16k tokens, and the size of the
  state, which does not grow.

The last line is `summary niah_best_16k=<accuracy> variant=<name> swa_16k=<accuracy or na>
full_attention_16k=<accuracy or na>`: models other than the shipped one are not trained yet
(na). Nothing trains unless --finetune is given: then the shipped model is first trained further
with the supervised passkey loss, stage by stage (STEPS:DISTANCE: distances 2..DISTANCE with the
usual curriculum, batch 16, learning rate 1e-3), and the result is measured (and saved).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from titans_mini.checkpoint import ASSETS, load_checkpoint, save_checkpoint
from titans_mini.recall.long_context import gate_trace, streamed_recall, survival, time_per_token
from titans_mini.recall.tasks import passkey_length, passkey_prompts
from titans_mini.recall.training import train_passkey

DISTANCES = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
COST_CONTEXTS = (1024, 4096, 16384)


def main(argv: list[str] | None = None) -> dict[int, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="32 prompts a distance instead of 256 (about a minute)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--distances", type=int, nargs="+", default=list(DISTANCES), help="needle distances")
    parser.add_argument("--contexts", type=int, nargs="+", default=list(COST_CONTEXTS),
                        help="context lengths for the cost per token")
    parser.add_argument("--model", default=str(ASSETS / "long_context_model.pt"), help="checkpoint to start from")
    parser.add_argument("--finetune", nargs="+", default=[], metavar="STEPS:DISTANCE",
                        help="train further first, stage by stage, e.g. 400:1024 300:4096")
    parser.add_argument("--first-stage-seed", type=int, default=0, help="seed of the first --finetune stage (then +1 each)")
    parser.add_argument("--save", default=None, help="save the (fine-tuned) model here")
    parser.add_argument("--json", default=None, help="write the accuracies, gates and costs to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    n = 32 if args.quick else 256
    model, info = load_checkpoint(args.model)
    for i, stage in enumerate(args.finetune):
        steps, high = (int(v) for v in stage.split(":"))
        start = time.perf_counter()
        history = train_passkey(model, steps, distances=(2, high), seq_len=passkey_length(high) + 16, batch_size=16,
                                lr=1e-3, curriculum=0.5, seed=args.first_stage_seed + i, progress=False)
        print(f"fine-tuned {steps} steps on distances 2..{high} in {time.perf_counter() - start:.0f} s "
              f"(last loss {history[-1]['loss']:.3f})", flush=True)
        info = {**info, "finetune": " ".join(args.finetune[: i + 1])}
    if args.save:
        save_checkpoint(model, args.save, **info)
    print(f"model: {model.config.variant}, window {model.config.window}, {model.config.n_layers} layers, "
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

    print("\ncost of one new token after a context (streamed, one prompt; median of 5 blocks of 16 tokens)")
    costs = {}
    for context in args.contexts:
        ms, numbers = time_per_token(model, context)
        costs[context] = {"ms_per_token": round(ms, 2), "state_numbers": numbers}
        print(f"context {context:6,d}: {ms:.2f} ms per token, state {numbers:,} numbers")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": info, "prompts_per_distance": n, "accuracy": accuracy, "costs": costs,
                       "mean_alpha": [g["alpha"][:, needle + 1:].mean().item() for g in trace]}, f, indent=1)

    at_16k = f"{accuracy[16384]:.3f}" if 16384 in accuracy else "na"
    print(f"summary niah_best_16k={at_16k} variant={model.config.variant} swa_16k=na full_attention_16k=na")
    return accuracy


if __name__ == "__main__":
    main()

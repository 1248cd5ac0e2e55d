"""GRPO on the mission's task: a small Titans model (MAC) recalls a passkey beyond its window.

For each seed (`titans_mini.recall.rl` holds the pieces, shared with notebook 06):
  1. build a small `TitansLM` and pre-train it, supervised, on the passkey task
     (`recall_rl.pretrain`): first briefly at a distance inside the window, then
     alternating with the target distance, which is beyond it, and stop as soon as its
     expected sampled accuracy on validation prompts reaches `stop_at` = 0.2: clearly
     above chance (1/64), far from perfect;
  2. measure its sampled recall accuracy (temperature 1) on a fixed held-out prompt set;
  3. fine-tune it with GRPO (`recall_rl.grpo_finetune`): G one-token completions per
     prompt, reward 1 when the token is the passkey's value (`tasks.recall_reward`);
  4. measure again, on the same held-out prompts.

The model is MAC (window 16, memory chunk 8, dim 64, 2 layers) and the value sits 32
tokens before the question, twice MAC's segment: attention cannot see it, so it can
come only through the long-term memory. Straight at distance 32 MAC stayed at chance
for 300+ steps; the curriculum (inside-the-window steps first) gets it above 0.2 in
~190 steps. `--variant lmm` (the memory alone) learns faster still.

Then a short second section shows GRPO's collapse pitfall: the same pre-trained model
fine-tuned with a far too high learning rate (30x) and a group of 2 becomes
deterministic, each group's rewards become equal (zero_std_frac -> 1), every advantage
is 0, the gradient vanishes and the reward stays where the collapse left it.

    python -m benchmarks.grpo_recall            # 3 seeds + the collapse section (~5 min, 1 thread)
    python -m benchmarks.grpo_recall --quick    # 1 seed, fewer steps, no collapse section
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import replace

import torch

from titans_mini.device import pick_device, seed_everything
from titans_mini.models import TitansLM
from titans_mini.recall.rl import TEST_SEED, RecallSetup, grpo_finetune, pretrain, prompt_set, recall_accuracy


def quick(setup: RecallSetup) -> RecallSetup:
    """A lighter run: fewer steps and prompts."""
    return replace(setup, max_pretrain_steps=200, grpo_steps=15, eval_prompts=256)


def collapse(setup: RecallSetup, steps: int = 20) -> RecallSetup:
    """The pitfall: lr 30x higher and a group of 2, as many samples per step as `setup`."""
    G = 2
    return replace(setup, grpo=replace(setup.grpo, lr=30 * setup.grpo.lr, group_size=G), grpo_steps=steps,
                   prompts_per_step=setup.prompts_per_step * setup.grpo.group_size // G)


def run_seed(setup: RecallSetup, seed: int, device: torch.device) -> dict:
    """Pre-train, measure, GRPO, measure again. Returns accuracies, steps, metrics and the pre-trained weights."""
    seed_everything(seed)
    model = TitansLM(setup.model).to(device)
    steps = pretrain(model, setup, seed)
    test = prompt_set(setup.eval_prompts, setup.distance, TEST_SEED, device)
    before = recall_accuracy(model, *test, samples=setup.eval_samples)
    pretrained = copy.deepcopy(model.state_dict())
    history = grpo_finetune(model, setup, seed)
    after = recall_accuracy(model, *test, samples=setup.eval_samples)
    return {"seed": seed, "before": before, "after": after, "pretrain_steps": steps,
            "history": history, "pretrained": pretrained}


def seed_line(result: dict) -> str:
    before, after = result["before"]["sampled"], result["after"]["sampled"]
    return f"seed={result['seed']} before={before:.3f} after={after:.3f} gain={after - before:+.3f}"


def summary_line(results: list[dict]) -> str:
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    before = mean([r["before"]["sampled"] for r in results])
    after = mean([r["after"]["sampled"] for r in results])
    return f"summary mean_before={before:.3f} mean_after={after:.3f} mean_gain={after - before:+.3f}"


def show_collapse(setup: RecallSetup, pretrained: dict, seed: int, device: torch.device,
                  steps: int = 20) -> list[dict[str, float]]:
    """GRPO from the same pre-trained weights with the collapse settings, logged every 5 steps."""
    model = TitansLM(setup.model).to(device)
    model.load_state_dict(pretrained)
    bad = collapse(setup, steps)
    print(f"collapse: seed {seed}, lr={bad.grpo.lr:g}, group_size={bad.grpo.group_size}, "
          f"{bad.prompts_per_step} prompts/step (as many samples per step as above)", flush=True)
    history = grpo_finetune(model, bad, seed, log_every=5)
    last = history[-5:]
    mean = lambda key, hs: sum(h[key] for h in hs) / len(hs)  # noqa: E731
    print(f"collapse summary: reward {history[0]['reward_mean']:.3f} -> {mean('reward_mean', last):.3f}, "
          f"zero_std_frac {history[0]['zero_std_frac']:.2f} -> {mean('zero_std_frac', last):.2f} "
          "(first step -> mean of the last 5)")
    return history


def run(setup: RecallSetup, seeds: list[int], device: torch.device, collapse_steps: int = 0) -> list[dict]:
    """Every seed, the summary and (collapse_steps > 0) the collapse section, printed as they finish."""
    m = setup.model
    print(f"TitansLM {m.variant} dim={m.dim} layers={m.n_layers} window={m.window} chunk={m.chunk_size} "
          f"({TitansLM(m).num_parameters():,} parameters) on {device}; passkey distance {setup.distance} "
          f"({setup.distance / m.window:.1f}x the window); GRPO G={setup.grpo.group_size} lr={setup.grpo.lr:g} "
          f"{setup.grpo_steps} steps x {setup.prompts_per_step} prompts; accuracy = sampled at temperature 1 "
          f"on {setup.eval_prompts} held-out prompts x {setup.eval_samples}", flush=True)
    start = time.perf_counter()
    results = []
    for seed in seeds:
        t0 = time.perf_counter()
        result = run_seed(setup, seed, device)
        results.append(result)
        b, a = result["before"], result["after"]
        zero_std = sum(h["zero_std_frac"] for h in result["history"]) / max(len(result["history"]), 1)
        print(f"  pre-trained {result['pretrain_steps']} steps; greedy {b['greedy']:.3f} -> {a['greedy']:.3f}, "
              f"expected {b['expected']:.3f} -> {a['expected']:.3f}; GRPO mean zero_std_frac {zero_std:.2f}; "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        print(seed_line(result), flush=True)
    print(summary_line(results), flush=True)
    if collapse_steps:
        t0 = time.perf_counter()
        show_collapse(setup, results[0]["pretrained"], seeds[0], device, collapse_steps)
        print(f"  collapse section {time.perf_counter() - t0:.0f} s")
    print(f"total time {time.perf_counter() - start:.0f} s")
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, fewer steps, no collapse section")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (--quick: 0)")
    parser.add_argument("--distance", type=int, default=None, help="value -> question distance (default 32)")
    parser.add_argument("--variant", default=None, help="TitansConfig variant (default mac)")
    parser.add_argument("--collapse-steps", type=int, default=None,
                        help="GRPO steps of the collapse section, 0 = skip (default 20; --quick: 0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: a tiny model, more threads mostly add overhead)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    setup = quick(RecallSetup()) if args.quick else RecallSetup()
    if args.distance is not None:
        setup = replace(setup, distance=args.distance)
    if args.variant is not None:
        setup = replace(setup, model=replace(setup.model, variant=args.variant))
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    collapse_steps = args.collapse_steps if args.collapse_steps is not None else (0 if args.quick else 20)
    return run(setup, seeds, pick_device(), collapse_steps)


if __name__ == "__main__":
    main()

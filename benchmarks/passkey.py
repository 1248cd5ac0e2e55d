"""Passkey recall beyond the attention window: the five variants at one budget, then ablations.

Every model is a small `TitansLM` (dim 64, 2 layers, 4 heads, window 16, memory chunk 8)
trained with `titans_mini.recall.training.train_passkey` on distances 2..64 (needle to question;
64 = 4x the window) with the same steps, batch, learning rate and curriculum, then
evaluated greedily at each distance in `EVAL_DISTANCES` on 256 fresh rows (chance: 1/64).
One sliding-window layer bridges a distance of at most `window - 2`; two stacked layers
relay it twice, up to `REACH` = 2 (window - 1) - 1 = 29. Beyond that only a memory can
answer: the "beyond" columns are the distances 32, 48 and 64.

The ablations retrain one variant with one switch changed: by default the memory alone
(lmm), as the paper's table 5 does: no momentum (eta = 0), no forgetting (alpha = 0), a
linear (matrix) memory, no convolution (and no persistent tokens for the variants that
have attention), and print our beyond-reach accuracy beside the paper's numbers.

    python -m benchmarks.passkey                         # variants + ablations, seed 0
    python -m benchmarks.passkey --seeds 0 1 2 --jobs 2  # more seeds, two runs at a time
    python -m benchmarks.passkey --only variants --save models/   # keep each variant's model
    python -m benchmarks.passkey --quick                 # tiny budget: checks the script runs

Results go to stdout (one line per run, then the tables) and, with --json, to a file that
notebook 05 reads.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace

import torch

from titans_mini.checkpoint import save_checkpoint
from titans_mini.config import MEMORY_VARIANTS, VARIANTS, TitansConfig
from titans_mini.models import TitansLM
from titans_mini.recall.tasks import passkey_length
from titans_mini.recall.training import passkey_accuracy, train_passkey

BASE = TitansConfig(dim=64, n_layers=2, heads=4, window=16, chunk_size=8)
EVAL_DISTANCES = (4, 8, 12, 16, 24, 32, 48, 64)
REACH = BASE.n_layers * (BASE.window - 1) - 1  # the longest distance stacked windows can bridge
# Paper table 5 (long-context column) for the ablations: full LMM 92.7.
ABLATIONS = {
    "full": ({}, 92.7),
    "no momentum": ({"momentum": False}, 87.1),
    "no forgetting": ({"forgetting": False}, 85.6),
    "linear memory": ({"memory_depth": 1}, 85.3),
    "no convolution": ({"conv_kernel": 0}, 90.3),
    "no persistent": ({"n_persistent": 0}, 92.5),
}


def ablations(variant: str) -> dict[str, tuple[dict, float]]:
    """The ablations that change something in `variant` (lmm has no attention, so no persistent tokens)."""
    return {k: v for k, v in ABLATIONS.items() if not (variant == "lmm" and "n_persistent" in v[0])}


@dataclass(frozen=True)
class Budget:
    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    distances: tuple[int, int] = (2, 64)
    slack: int = 16  # filler beyond the longest distance: the needle's position varies by this much
    curriculum: float = 0.5
    distractors: int = 0  # other key/value pairs between needle and question (`training.pairs_at`)


def run(name: str, config: TitansConfig, budget: Budget, seed: int, save: str | None = None) -> dict:
    """Train one model, evaluate it at every distance; returns a JSON-ready record."""
    torch.set_num_threads(1)  # tiny models: one thread per run, `--jobs` runs side by side
    torch.manual_seed(seed)
    model = TitansLM(config)
    start = time.perf_counter()
    history = train_passkey(model, budget.steps, distances=budget.distances, batch_size=budget.batch_size,
                            seq_len=passkey_length(budget.distances[1]) + budget.slack, lr=budget.lr,
                            curriculum=budget.curriculum, distractors=budget.distractors, seed=seed,
                            progress=False)
    seconds = time.perf_counter() - start
    accuracy = {d: passkey_accuracy(model, d, seq_len=passkey_length(d) + budget.slack, seed=10_000 + seed,
                                    distractors=budget.distractors)
                for d in EVAL_DISTANCES}
    if save:
        save_checkpoint(model, save, steps=budget.steps, seed=seed)
    return {"name": name, "config": config.to_dict(), "seed": seed, "seconds": round(seconds, 1),
            "parameters": model.num_parameters(), "final_loss": history[-1]["loss"], "accuracy": accuracy}


def beyond(record: dict) -> float:
    """Mean accuracy at the distances attention alone cannot reach (> REACH)."""
    values = [a for d, a in record["accuracy"].items() if int(d) > REACH]
    return sum(values) / len(values)


def print_record(record: dict) -> None:
    accuracy = " ".join(f"{int(d):>2}:{a:5.3f}" for d, a in record["accuracy"].items())
    print(f"{record['name']:<15} seed={record['seed']} params={record['parameters']:,} "
          f"loss={record['final_loss']:.3f} {record['seconds']:.0f}s  acc@distance {accuracy}", flush=True)


def mean_accuracy(records: list[dict], name: str) -> dict[int, float]:
    rows = [r for r in records if r["name"] == name]
    return {int(d): sum(r["accuracy"][d] for r in rows) / len(rows) for d in rows[0]["accuracy"]}


def config_field(item: str) -> tuple[str, int | bool]:
    """ "memory_output_gate=true" -> ("memory_output_gate", True); "window=32" -> ("window", 32)."""
    name, sep, value = item.partition("=")
    if not sep:
        raise SystemExit(f"--set expects FIELD=VALUE, got {item!r}")
    lowered = value.lower()
    return name, lowered == "true" if lowered in ("true", "false") else int(value)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=None, help=f"training steps per run (default {Budget.steps})")
    parser.add_argument("--only", choices=("variants", "ablations"), default=None)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["swa", "lmm", "mac", "mag", "mal"])
    parser.add_argument("--ablate", default="lmm", choices=MEMORY_VARIANTS, help="variant the ablations change")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (one thread each)")
    parser.add_argument("--distractors", type=int, default=0,
                        help="other key/value pairs between needle and question (a harder task; default 0)")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="change TitansConfig fields of every run, e.g. --set memory_output_gate=true")
    parser.add_argument("--quick", action="store_true", help="20 steps, distances 2..24: checks the script runs")
    parser.add_argument("--json", default=None, help="write every record to this file")
    parser.add_argument("--save", default=None, help="folder: save each variant's first-seed model as <variant>.pt")
    args = parser.parse_args(argv)

    base = BASE.replace(**dict(config_field(item) for item in args.set))
    budget = Budget(steps=20, distances=(2, 24)) if args.quick else Budget()
    budget = replace(budget, steps=args.steps or budget.steps, distractors=args.distractors)
    jobs = []
    if args.only != "ablations":
        for variant in args.variants:
            for seed in args.seeds:
                save = f"{args.save}/{variant}.pt" if args.save and seed == args.seeds[0] else None
                jobs.append((variant, base.replace(variant=variant), budget, seed, save))
    if args.only != "variants":
        for name, (change, _) in ablations(args.ablate).items():
            if name == "full" and args.only != "ablations" and args.ablate in args.variants:
                continue  # the variant run above is the full model
            for seed in args.seeds:
                jobs.append((f"{args.ablate} {name}" if name != "full" else args.ablate,
                             base.replace(variant=args.ablate, **change), budget, seed, None))
    print(f"passkey: {len(jobs)} runs, {budget.steps} steps x batch {budget.batch_size}, lr {budget.lr}, "
          f"distances {budget.distances[0]}..{budget.distances[1]} (curriculum {budget.curriculum}), "
          f"{budget.distractors} distractor pairs, "
          f"window {BASE.window}; chance = 1/64 = 0.016", flush=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run, *job) for job in jobs]
        records = []
        for future in futures:
            records.append(future.result())
            print_record(records[-1])
    names = list(dict.fromkeys(r["name"] for r in records))

    print(f"\naccuracy vs distance (mean of {len(args.seeds)} seed(s); {BASE.n_layers} sliding windows of "
          f"{BASE.window} bridge at most {REACH})")
    print(f"{'model':<22}" + "".join(f"{d:>7}" for d in EVAL_DISTANCES))
    for name in names:
        accuracy = mean_accuracy(records, name)
        print(f"{name:<22}" + "".join(f"{accuracy[d]:7.3f}" for d in EVAL_DISTANCES))
    if args.only != "variants":
        print(f"\nablations of {args.ablate}: mean accuracy (%) beyond attention's reach (distances > {REACH}) "
              "beside the paper's table 5 (long-context column, LMM)")
        for name, (_, paper) in ablations(args.ablate).items():
            label = args.ablate if name == "full" else f"{args.ablate} {name}"
            rows = [r for r in records if r["name"] == label]
            ours = sum(beyond(r) for r in rows) / len(rows)
            loss = sum(r["final_loss"] for r in rows) / len(rows)
            print(f"{name:<16} ours {100 * ours:5.1f} (final loss {loss:.3f})   paper {paper:5.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"budget": budget.__dict__, "eval_distances": EVAL_DISTANCES, "reach": REACH,
                       "ablated": args.ablate, "records": records}, f, indent=1)
    print(f"total time {time.perf_counter() - start:.0f} s")
    beyond_reach = {name: sum(beyond(r) for r in records if r["name"] == name) / len(args.seeds) for name in names}
    print("summary " + " ".join(f"{name.replace(' ', '_')}_beyond={value:.3f}" for name, value in beyond_reach.items()))
    return records


if __name__ == "__main__":
    main()

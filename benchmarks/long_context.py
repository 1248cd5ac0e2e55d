"""Passkey recall far beyond the training length, for every variant: how long does the memory hold a needle?

    python -m benchmarks.long_context --quick      # the shipped models only (under two minutes)
    python -m benchmarks.long_context --train mac mag mal lmm swa transformer --seeds 0 1 2
                                                   # trains and evaluates each model (RECIPES, one CPU thread)
    python -m benchmarks.long_context --costs --threads 2 --json titans_mini/assets/long_context_results.json
        # the report notebook 08 reads: the shipped models evaluated, the trained ones read back,
        # time per token and peak memory from 1k to 64k tokens

Models (window 16, 2 layers, 145-195 k parameters): the five of `benchmarks/passkey.py` (MAC,
MAG, MAL, the memory alone LMM, sliding-window attention SWA) and a Transformer with full causal
attention, all trained by the same recipe ("base"): distances 2..64, then 2..1,024 (a length
curriculum); "long" adds a stage on distances up to 4,096; "stream" one more on distances up to
16,384, where each row's first tokens are streamed without gradients and only its last 1,024
get them (truncated backpropagation, `training.passkey_loss`): a 16k-token row costs a forward
over 16k tokens and a backward over 1k. Each recipe starts from the model of the one before it
when --runs has it. Each trained model and its record are kept under --runs; a run already
there is not trained again, so a long experiment can be split across sessions.

Each prompt is streamed in pieces of 1,024 tokens with the state passed on, at needle
distances from 64 to 16,384 tokens (1,024x the window), in two haystacks
(`tasks.passkey_batch`): "filler" (16 filler tokens, the paper's S-NIAH-PK) and "noise"
(every key, value and filler token but the needle's, and 8 distractor key/value pairs).
Greedy recall, chance 1/64.

--quick evaluates the models shipped in `titans_mini/assets` (the MAC passkey model trained to
distance 64, the same trained further to 1,024 then 4,096 with --finetune, both up to distance
2,048, and the best model of the recipes, an LMM trained to 16,384, at every distance) on the
filler haystack, 32 prompts a distance, and shows
the trained models' records from the shipped results (--results); a shipped model that is a copy
of a run (the LMM is lmm-stream seed 0) replaces that run's record at the distances measured live. Without
--quick: 64 prompts a distance (--prompts), both haystacks.

The last line is `summary niah_best_16k=<accuracy> variant=<name> swa_16k=<accuracy>
full_attention_16k=<accuracy>`: the best memory model at 16,384 (mean over its seeds) and the
two attention baselines (na where not measured).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from titans_mini.checkpoint import ASSETS, load_checkpoint, save_checkpoint
from titans_mini.config import MEMORY_VARIANTS, VARIANTS, TitansConfig
from titans_mini.models import TitansLM
from titans_mini.recall.long_context import gate_trace, streamed_recall, survival, time_per_token
from titans_mini.recall.tasks import passkey_length, passkey_prompts
from titans_mini.recall.training import train_passkey

DISTANCES = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
HAYSTACKS = {"filler": 0, "noise": 8}  # haystack -> distractor pairs
COST_CONTEXTS = (1024, 4096, 16384, 65536)
QUICK_REACH = 2048  # --quick measures the shipped MAC models live up to this distance (the time limit)
# shipped file -> (what it is, the run it is a copy of, if any: its records go by the run's name and seed)
SHIPPED = {"passkey_model": ("MAC, trained to distance 64 (benchmarks/passkey.py)", None),
           "long_context_model": ("MAC, trained further to 1,024 then 4,096 (--finetune 400:1024 300:4096)", None),
           "long_context_lmm": ("LMM, recipe 'stream', seed 0: the best recipe at 16,384", ("lmm-stream", 0))}
BASE = TitansConfig(dim=64, n_layers=2, heads=4, window=16, chunk_size=8)
# (steps, longest distance, batch, learning rate, backprop) per stage; a length curriculum inside
# each stage; backprop: gradients through a row's last tokens only (`training.passkey_loss`), None: all.
# Each recipe goes on where the one before it stops, so a model is trained further, not again.
RECIPES = {"base": ((600, 64, 32, 3e-3, None), (400, 1024, 16, 1e-3, None))}
RECIPES["long"] = RECIPES["base"] + ((300, 4096, 16, 1e-3, None),)
RECIPES["stream"] = RECIPES["long"] + ((150, 16384, 16, 1e-3, 1024),)


def train(model: TitansLM, stages, seed: int, first: int = 0) -> float:
    """Train `model` stage by stage on the passkey task (distances 2..high, `training.train_passkey`,
    curriculum over the first half of each stage), from stage `first`; returns the seconds it took."""
    start = time.perf_counter()
    for i, (steps, high, batch, lr, backprop) in list(enumerate(stages))[first:]:
        history = train_passkey(model, steps, distances=(2, high), seq_len=passkey_length(high) + 16,
                                batch_size=batch, lr=lr, curriculum=0.5, seed=seed * 100 + i, progress=False,
                                backprop=backprop)
        skipped = sum(h["skipped"] for h in history)
        print(f"  stage {i + 1}: {steps} steps on distances 2..{high}"
              + (f", gradients through the last {backprop} tokens" if backprop else "")
              + f", last loss {history[-1]['loss']:.3f}" + (f", {skipped} steps skipped" if skipped else "")
              + f" ({time.perf_counter() - start:.0f} s)", flush=True)
    return time.perf_counter() - start


def recall_table(model: TitansLM, distances, n: int, haystacks) -> dict[str, dict[int, float]]:
    table = {}
    for haystack in haystacks:
        table[haystack] = {}
        for d in distances:
            table[haystack][d] = streamed_recall(model, d, n=n, haystack=haystack, distractors=HAYSTACKS[haystack])
        print(f"  {haystack:>6}: " + " ".join(f"{d}:{a:.2f}" for d, a in table[haystack].items()), flush=True)
    return table


def run_name(variant: str, recipe: str, averaged: bool = False) -> str:
    """e.g. "lmm", "mal-long", "lmm-avg-stream" (averaged: `TitansConfig.averaged_momentum`)."""
    return variant + ("-avg" if averaged else "") + ("" if recipe == "base" else f"-{recipe}")


def train_run(variant: str, recipe: str, seed: int, runs: Path, n: int, distances, averaged: bool = False) -> None:
    """One (variant, recipe, seed) trained and evaluated, unless `runs` has it already. A run
    starts from the model of the longest earlier recipe of the same seed in `runs`, if any
    (the same first stages), and trains only the stages that recipe lacks. `averaged`: the
    memory's momentum averaged (`NeuralMemory`'s averaged_momentum), runs named "-avg"."""
    name = run_name(variant, recipe, averaged)
    if (runs / f"{name}_{seed}.json").exists():
        return
    torch.manual_seed(seed)
    model, first = TitansLM(BASE.replace(variant=variant, averaged_momentum=averaged)), 0
    earlier = [r for r in RECIPES if len(RECIPES[r]) < len(RECIPES[recipe])]
    for r in sorted(earlier, key=lambda r: -len(RECIPES[r])):
        path = runs / f"{run_name(variant, r, averaged)}_{seed}.pt"
        if path.exists():
            model, first = load_checkpoint(path)[0].train(), len(RECIPES[r])
            print(f"{name} seed {seed}: from {path}", flush=True)
            break
    print(f"{name} seed {seed}: {model.num_parameters():,} parameters", flush=True)
    seconds = train(model, RECIPES[recipe], seed, first)
    save_checkpoint(model, runs / f"{name}_{seed}.pt", seed=seed)
    record = {"name": name, "variant": variant, "seed": seed, "seconds": round(seconds), "prompts": n,
              "parameters": model.num_parameters(), "recipe": [list(s) for s in RECIPES[recipe]],
              "accuracy": recall_table(model, distances, n, HAYSTACKS)}
    (runs / f"{name}_{seed}.json").write_text(json.dumps(record, indent=1))


def peak_rss_mb() -> float | None:
    """This process's peak resident memory since the last `reset_peak_rss` (Linux only; else None)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
    except OSError:
        pass


def cost(model: TitansLM, context: int) -> dict[str, float]:
    """ms per new token after `context` tokens, the state's size and the peak memory above the
    resident size before the prompt was read (on CPU, Linux)."""
    reset_peak_rss()
    before = peak_rss_mb()
    ms, numbers = time_per_token(model, context)
    after = peak_rss_mb()
    peak = None if before is None else round(after - before, 1)
    return {"ms_per_token": round(ms, 2), "state_mb": round(4 * numbers / 2**20, 2), "peak_mb": peak}


def mean_over_seeds(records: list[dict], haystack: str) -> dict[str, dict[int, list[float]]]:
    by_name: dict[str, dict[int, list[float]]] = {}
    for r in records:
        for d, a in r["accuracy"][haystack].items():
            by_name.setdefault(r["name"], {}).setdefault(int(d), []).append(a)
    return by_name


def print_table(records: list[dict], haystack: str, distances) -> None:
    print(f"\n{haystack} haystack: greedy recall, mean over seeds (min-max)")
    print(f"{'model':<20}{'seeds':>6}" + "".join(f"{d:>12,d}" for d in distances))
    for name, by_d in mean_over_seeds(records, haystack).items():
        seeds = len(next(iter(by_d.values())))
        cells = "".join(f"{statistics.mean(by_d[d]):7.2f}" + (f"±{(max(by_d[d]) - min(by_d[d])) / 2:.2f}" if seeds > 1 else "     ")
                        if d in by_d else f"{'':>12}" for d in distances)
        print(f"{name:<20}{seeds:>6}{cells}")


def forgetting_report(model: TitansLM, distances) -> list[float]:
    """Mean alpha_t along a filler haystack and the share of the needle's write it leaves."""
    ids = passkey_prompts(4, max(distances), generator=torch.Generator().manual_seed(1))["prompt_ids"]
    needle = 3  # the value's position; the question comes `distance` tokens later
    print("  forgetting along the haystack: mean alpha_t per memory layer, and prod(1 - alpha) over each distance")
    print(f"  {'layer':>5} {'alpha':>8}" + "".join(f"{d:>9,d}" for d in distances))
    means = []
    for layer, gates in enumerate(gate_trace(model, ids)):
        alpha = gates["alpha"][:, needle + 1:]
        means.append(alpha.mean().item())
        print(f"  {layer:5d} {means[-1]:8.4f}" + "".join(f"{survival(alpha[:, :d]).mean().item():9.1e}" for d in distances))
    return means


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the shipped models only, 32 prompts a distance")
    parser.add_argument("--train", nargs="*", default=[], choices=VARIANTS, metavar="VARIANT",
                        help=f"train and evaluate these variants ({', '.join(VARIANTS)})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--recipe", choices=RECIPES, default="base",
                        help="base: distances to 64 then 1,024; long: then to 4,096; stream: then to 16,384 with "
                             "gradients through the last 1,024 tokens (each from the one before, if trained)")
    parser.add_argument("--averaged-momentum", action="store_true",
                        help="--train with the memory's momentum averaged (NeuralMemory's averaged_momentum)")
    parser.add_argument("--runs", default="runs/long_context", help="folder of trained models and their records")
    parser.add_argument("--costs", action="store_true", help="time per token and peak memory (LMM, MAC, Transformer)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: 2 with --quick, else 1)")
    parser.add_argument("--prompts", type=int, default=64, help="prompts a distance and haystack (--quick: 32)")
    parser.add_argument("--distances", type=int, nargs="+", default=list(DISTANCES), help="needle distances")
    parser.add_argument("--contexts", type=int, nargs="+", default=list(COST_CONTEXTS), help="contexts for --costs")
    parser.add_argument("--model", default=None, help="a checkpoint to start --finetune from")
    parser.add_argument("--finetune", nargs="+", default=[], metavar="STEPS:DISTANCE[:BACKPROP]",
                        help="train --model further (batch 16, lr 1e-3), e.g. 400:1024 300:4096 150:16384:1024, "
                             "and --save it")
    parser.add_argument("--save", default=None, help="where --finetune saves the model (its record beside it, .json)")
    parser.add_argument("--json", default=None, help="write every record, the costs and the gates here")
    parser.add_argument("--results", default=str(ASSETS / "long_context_results.json"),
                        help="--quick shows the trained models' records from this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or (2 if args.quick else 1))
    runs = Path(args.runs)
    out: dict = {"distances": args.distances, "haystacks": HAYSTACKS, "records": [], "costs": {}, "gates": {}}

    if args.finetune:  # how the shipped long-context model was made from the shipped passkey model
        model, info = load_checkpoint(args.model or ASSETS / "passkey_model.pt")
        stages = []
        for stage in args.finetune:
            steps, high, *backprop = map(int, stage.split(":"))
            stages.append((steps, high, 16, 1e-3, backprop[0] if backprop else None))
        seed = info.get("seed", 0)
        seconds = train(model, stages, seed=seed)
        finetune = " ".join(filter(None, [info.get("finetune"), *args.finetune]))  # every stage since the passkey model
        save = Path(args.save or "long_context_model.pt")
        save_checkpoint(model, save, **{**info, "finetune": finetune})
        # evaluated like a recipe's run; under --runs as <name>_<seed>.pt, the report reads it with the runs
        name = save.stem.removesuffix(f"_{seed}")
        record = {"name": name, "variant": model.config.variant, "seed": seed, "seconds": round(seconds),
                  "prompts": args.prompts, "parameters": model.num_parameters(), "finetune": finetune,
                  "accuracy": recall_table(model, args.distances, args.prompts, HAYSTACKS)}
        save.with_suffix(".json").write_text(json.dumps(record, indent=1))
        return out

    n = 32 if args.quick else args.prompts
    shipped = {}
    for name, (label, run) in SHIPPED.items():
        model, _ = load_checkpoint(ASSETS / f"{name}.pt")
        shipped[name] = model
        # a training job only trains; the report measures a shipped copy of a run with the runs
        if args.train or (run and not args.quick):
            continue
        # --quick: the MAC models live to QUICK_REACH only (the rest as saved), the best model everywhere
        distances = [d for d in args.distances if not (args.quick and not run and d > QUICK_REACH)]
        print(f"{name} ({label}): {n} prompts a distance, chance 1/64 = 0.016", flush=True)
        haystacks = ["filler"] if args.quick else list(HAYSTACKS)
        accuracy = recall_table(model, distances, n, haystacks)
        record_name, seed = run or (name, 0)
        out["records"].append({"name": record_name, "variant": model.config.variant, "seed": seed, "prompts": n,
                               "accuracy": accuracy})
        out["gates"][name] = forgetting_report(model, args.distances)

    if args.quick and Path(args.results).exists():  # the trained models, as the full run measured them
        live = {(r["name"], r["seed"]): r for r in out["records"]}
        saved = []
        for r in json.loads(Path(args.results).read_text())["records"]:
            if (r["name"], r["seed"]) not in live:
                saved.append(r)
                continue
            for haystack, by_distance in r["accuracy"].items():  # distances not measured live: as saved
                measured = live[(r["name"], r["seed"])]["accuracy"].setdefault(haystack, {})
                for d, a in by_distance.items():
                    measured.setdefault(int(d), a)
        out["records"] += saved
        print(f"\n{len(saved)} records read back from {args.results} (not measured again by --quick)")
    if not args.quick:
        runs.mkdir(parents=True, exist_ok=True)
        for variant in args.train:
            for seed in args.seeds:
                train_run(variant, args.recipe, seed, runs, n, args.distances, args.averaged_momentum)
        out["records"] += [json.loads(p.read_text()) for p in sorted(runs.glob("*.json"))]
    for haystack in HAYSTACKS:
        if any(haystack in r["accuracy"] for r in out["records"]):
            print_table([r for r in out["records"] if haystack in r["accuracy"]], haystack, args.distances)

    if args.costs:
        print("\ncost of one new token after a context (streamed, one prompt; median of 5 blocks of 16 tokens)")
        # the cost depends on the shapes only: a Transformer of the recipes' size, trained if --runs has one
        path = next(iter(sorted(runs.glob("transformer_*.pt"))), None)
        models = {"mac": shipped["long_context_model"], "lmm": shipped["long_context_lmm"],
                  "transformer": load_checkpoint(path)[0] if path else TitansLM(BASE.replace(variant="transformer")).eval()}
        for name, model in models.items():
            out["costs"][name] = {c: cost(model, c) for c in args.contexts}
            for c, figures in out["costs"][name].items():
                print(f"{name:>12} context {c:6,d}: {figures['ms_per_token']:6.2f} ms per token, "
                      f"state {figures['state_mb']:7.2f} MB, peak {figures['peak_mb']} MB above the start", flush=True)

    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    at = {name: statistics.mean(by_d[16384]) for name, by_d in mean_over_seeds(out["records"], "filler").items()
          if 16384 in by_d}
    variant_of = {r["name"]: r["variant"] for r in out["records"]}
    memory = {name: a for name, a in at.items() if variant_of[name] in MEMORY_VARIANTS}
    best = max(memory, key=memory.get) if memory else None
    fmt = lambda name: f"{at[name]:.3f}" if name in at else "na"  # noqa: E731
    print(f"summary niah_best_16k={fmt(best)} variant={variant_of.get(best, 'na')} swa_16k={fmt('swa')} "
          f"full_attention_16k={fmt('transformer')}")
    return out


if __name__ == "__main__":
    main()

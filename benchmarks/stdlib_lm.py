"""Does the memory help on real text? Byte-level models of the Python standard library.

    python -m benchmarks.stdlib_lm --quick            # 3 tiny models, a few steps: checks the script runs
    python -m benchmarks.stdlib_lm --seeds 0 1 2      # the experiment: six models, each trained then measured
    python -m benchmarks.stdlib_lm --json titans_mini/assets/stdlib_lm_results.json   # the report notebook 09 reads
    python -m benchmarks.stdlib_lm --variants swa mag --seeds 1 2 --json ...  # more seeds, reported with the rest
    python -m benchmarks.stdlib_lm --segments 16 ...  # trained on streams of 16 windows, the state carried

Six models of about the same size, trained the same way (`titans_mini.text.train`: the same
steps, global batch and windows of --seq-len bytes, so the same training bytes): SWA and a
full-attention Transformer (the baselines), LMM (the memory alone), MAC, MAG and MAL. Each run
is kept under --runs (`<variant>_<seed>/`, `<variant>_s<K>_<seed>/` with --segments K), and a
run already there is not trained again, so the experiment can be split across sessions.
By default every training window starts from a fresh state; --segments K trains on streams
of K windows from a file's start with the state carried between them (`text.train`).

Measured on the test split (files never trained on), each file read whole from its first byte,
streamed with the state (`text.evaluate.loss_by_position`, files cut at --eval-bytes): bits per
byte overall and by position in the file. Paper table 1 is the question: its ordering
(Titans below Transformer++ below recurrent models in perplexity) at 340M-760M parameters and
15-30B tokens; ours is at about 250 thousand parameters and 5 million bytes.

The last line is `summary best=<variant> test_bpb=<bits per byte> swa=<...> transformer_windowed=<...>
transformer=<...>` (the Transformer read whole files, and with its attention cut to the
training windows).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from titans_mini.checkpoint import save_checkpoint
from titans_mini.models import TitansLM
from titans_mini.text import train as trainer
from titans_mini.text.data import ByteCorpus
from titans_mini.text.evaluate import POSITION_BINS, loss_by_position

VARIANTS = ("swa", "transformer", "lmm", "mac", "mag", "mal")
BASELINES = ("swa", "transformer", "transformer_windowed")


def run(variant: str, seed: int, args: argparse.Namespace, test: list[torch.Tensor]) -> dict:
    """Train one model (or find it trained) and measure it; the record is saved beside it."""
    out = Path(args.runs) / (f"{variant}_{seed}" if args.segments == 1 else f"{variant}_s{args.segments}_{seed}")
    record_path = out / "record.json"
    if record_path.exists():
        return json.loads(record_path.read_text())
    options = ["--variant", variant, "--seed", str(seed), "--out", str(out), "--threads", str(args.threads),
               "--steps", str(args.steps), "--dim", str(args.dim), "--layers", str(args.layers),
               "--window", str(args.window), "--chunk", str(args.chunk), "--seq-len", str(args.seq_len),
               "--batch", str(args.batch), "--segments", str(args.segments), "--eval-every", str(args.steps),
               "--save-every", str(save_every(args))]  # a run stopped midway resumes from its last checkpoint
    if (out / "checkpoint.pt").exists():
        options.append("--resume")
    start = time.perf_counter()
    result = trainer.main(options)
    seconds = time.perf_counter() - start
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    model = TitansLM(trainer.model_config(trainer.parse_args(options))).eval()
    model.load_state_dict(saved["model"])
    save_checkpoint(model, out / "model.pt", seed=seed, steps=args.steps)
    report = loss_by_position(model, test, piece=512)
    record = {"variant": variant, "seed": seed, "segments": args.segments,
              "parameters": model.num_parameters(), "seconds": round(seconds),
              "train_bytes": args.steps * args.batch * args.seq_len, "val_bpb": result["val_bpb"],
              "test": report, "history": [h["bpb"] for h in saved["history"]],
              "skipped_steps": [h["step"] for h in saved["history"] if h.get("skipped")]}
    if variant == "transformer":
        # Trained on windows of --seq-len bytes, full attention never saw two bytes further apart;
        # read whole files it must. So it is also measured the way it is usually deployed: the
        # same weights with attention cut to the last --seq-len bytes (an SWA model of that window).
        windowed = TitansLM(model.config.replace(variant="swa", window=args.seq_len)).eval()
        windowed.load_state_dict(model.state_dict())
        record["test_windowed"] = loss_by_position(windowed, test, piece=512)
    record_path.write_text(json.dumps(record, indent=1))
    print(f"{variant} seed {seed}: test {report['bpb']:.3f} bits per byte ({seconds:.0f} s)", flush=True)
    return record


def save_every(args: argparse.Namespace) -> int:
    """About 250 steps, a whole number of streams."""
    return max(args.segments, min(args.steps, 250) // args.segments * args.segments)


def key(record: dict) -> tuple:
    return record["variant"], record["seed"], record.get("segments", 1)


def print_report(records: list[dict]) -> dict[str, float]:
    by_variant: dict[str, list[dict]] = {}
    for r in records:
        by_variant.setdefault(r["variant"], []).append(r)
    bins = records[0]["test"]["bins"]
    labels = [f"{b['from']}-" if b["to"] is None else f"{b['from']}-{b['to'] - 1}" for b in bins]
    print(f"\n{'model':<22}{'params':>9}{'seeds':>6}{'val bpb':>9}{'test bpb':>10}   test bpb by position in the file: "
          + " ".join(f"{lab:>10}" for lab in labels))
    means = {}
    rows = [(v, rs, "test") for v, rs in by_variant.items()]
    if "transformer" in by_variant:  # its weights again, attention cut to the training windows
        rows.insert(2, ("transformer_windowed", by_variant["transformer"], "test_windowed"))
    for name, rs, key in rows:
        test = [r[key]["bpb"] for r in rs]
        means[name] = statistics.mean(test)
        spread = f"±{statistics.stdev(test):.3f}" if len(rs) > 1 else ""
        by_pos = [statistics.mean(r[key]["bins"][i]["bpb"] for r in rs) for i in range(len(bins))]
        print(f"{name:<22}{rs[0]['parameters']:>9,}{len(rs):>6}{statistics.mean(r['val_bpb'] for r in rs):9.3f}"
              f"{means[name]:7.3f}{spread:<6}" + " ".join(f"{b:10.3f}" for b in by_pos))
    print(f"(bytes measured per bin: {' '.join(str(b['bytes']) for b in bins)})")
    return means


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="SWA, Transformer and MAC, tiny, 5 steps: checks the script runs")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--segments", type=int, default=1, help="windows per training stream, the state carried")
    parser.add_argument("--eval-bytes", type=int, default=32768, help="read at most this many bytes of each test file")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", default="runs/stdlib_lm")
    parser.add_argument("--json", default=None, help="the records: (variant, seed, segments) already there are read back, "
                        "not trained again; every record is written back and the report covers all trained alike")
    args = parser.parse_args(argv)
    if args.quick:
        args.variants = ["swa", "transformer", "mac"]
        args.steps, args.dim, args.layers, args.seq_len, args.batch = 5, 16, 1, 64, 4
        args.window, args.chunk, args.eval_bytes, args.runs = 16, 8, 600, str(Path(args.runs) / "quick")
    torch.set_num_threads(args.threads)
    test = [f[: args.eval_bytes] for f in ByteCorpus("test").files if len(f) > 1]
    print(f"test split: {len(test)} files, {sum(len(f) for f in test):,} bytes read (each cut at {args.eval_bytes:,})")
    kept = {}  # records of an earlier session, shipped in --json (runs/ is not kept between machines)
    if args.json and Path(args.json).exists():
        kept = {key(r): r for r in json.loads(Path(args.json).read_text())["records"]}
    records = [kept.get((v, s, args.segments)) or run(v, s, args, test) for v in args.variants for s in args.seeds]
    fresh, carried = f"windows of {args.seq_len} bytes, each from a fresh state", \
        f"streams of {args.segments} windows of {args.seq_len} bytes from a file's start, the state carried"
    if args.json:
        kept.update({key(r): r for r in records})
        Path(args.json).write_text(json.dumps({"bins": list(POSITION_BINS), "records": list(kept.values())}, indent=1))
        # the report covers every record trained this way, those of earlier calls (other seeds) too
        records = sorted((r for r in kept.values() if r.get("segments", 1) == args.segments),
                         key=lambda r: (VARIANTS.index(r["variant"]), r["seed"]))
    print(f"\ntrained on {fresh if args.segments == 1 else carried}")
    means = print_report(records)
    best = min((v for v in means if v not in BASELINES), key=means.get, default=None)
    fmt = lambda v: f"{means[v]:.3f}" if v in means else "na"  # noqa: E731
    print(f"summary best={best or 'na'} test_bpb={fmt(best)} swa={fmt('swa')} "
          f"transformer_windowed={fmt('transformer_windowed')} transformer={fmt('transformer')}")
    return records


if __name__ == "__main__":
    main()

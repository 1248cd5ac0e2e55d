"""Train a byte-level Titans language model on the standard library, on one process or many.

    python -m titans_mini.text.train --variant mac --steps 2000 --out runs/lm/mac
    torchrun --nproc_per_node=2 -m titans_mini.text.train --variant mac --steps 2000 --out runs/lm/mac
    python -m titans_mini.text.train --variant mac --steps 2000 --out runs/lm/mac --resume   # carry on
    python -m titans_mini.text.train --variant mac --segments 16 ...   # streams of 16 windows, state carried

Several processes run PyTorch's own DistributedDataParallel (gloo on CPU, nccl on GPU):
each process takes its share of every global batch (`--batch` rows, the same rows
whatever the number of processes, see `ByteCorpus.batch`), and DDP averages the
gradients. With `--accum A` each process splits its share into A micro-batches and
DDP synchronises only after the last. Equal shares make the averaged gradient the
gradient of the global batch's mean loss, so N processes reach the weights of one
process (up to float rounding); `tests/test_text.py` checks it.

By default every window starts from a fresh state, so the model never reads past
`--seq-len` bytes. With `--segments K` each row is a stream of K windows from the start of
a file, read over K steps with the state (memory weights and momentum, attention cache)
carried from one window to the next and detached from the graph: truncated
backpropagation through time. The gradient then reaches only into the current window, but
the model learns to use, and not be thrown by, a state built over K * seq-len bytes, which
is how it reads a whole file at test time. The paper trains on fixed-length sequences and
does not say how its memory carries across them; this option is our choice.

A step whose gradient is not finite (the deep memory's inner loop can overflow on a long
carried state) is skipped rather than written into the weights, and the streams restart
from fresh states; the record in the history says `skipped`. The paper does not discuss
it; we do it so one bad window does not end a run, and we report how often it happened.

Every `--save-every` steps (and at the end) the first process writes `checkpoint.pt`
(model, optimiser, schedule, step, loss history; read back with weights_only=True) and
`loss.png` to `--out`. On a GPU the forward runs under bf16 autocast; the memory's inner
loop stays float32 (`NeuralMemory`). The last line is `summary val_bpb=... steps=... tokens=... skipped=...`.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..config import VARIANTS, TitansConfig
from ..models import TitansLM
from .data import ByteCorpus, describe

LN2 = math.log(2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--variant", choices=VARIANTS, default="mac")
    add("--dim", type=int, default=128)
    add("--layers", type=int, default=4)
    add("--heads", type=int, default=4)
    add("--window", type=int, default=64, help="attention window (MAC: segment length)")
    add("--chunk", type=int, default=16, help="memory chunk size")
    add("--seq-len", type=int, default=512, help="bytes per training window")
    add("--batch", type=int, default=16, help="windows per step, over all processes")
    add("--segments", type=int, default=1, help="windows per stream, the state carried between them (1: fresh each)")
    add("--accum", type=int, default=1, help="micro-batches per process per step")
    add("--steps", type=int, default=1000)
    add("--lr", type=float, default=2e-3)
    add("--warmup", type=int, default=50, help="steps of linear warm-up before the cosine decay")
    add("--seed", type=int, default=0)
    add("--eval-every", type=int, default=250, help="steps between validation measurements")
    add("--eval-batches", type=int, default=8)
    add("--save-every", type=int, default=250)
    add("--out", default="runs/lm/run")
    add("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    add("--until", type=int, default=None, help="stop after this step (a checkpoint is saved), to resume later")
    add("--threads", type=int, default=None, help="CPU threads per process")
    add("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "segments", "accum", "seq_len", "eval_every", "eval_batches", "save_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("steps", "save_every", "until"):  # a checkpoint falls between two streams, never inside one
        if getattr(args, name) is not None and getattr(args, name) % args.segments:
            parser.error(f"--{name.replace('_', '-')} must be a multiple of --segments {args.segments}, "
                         f"got {getattr(args, name)}")
    return args


def model_config(args: argparse.Namespace) -> TitansConfig:
    return TitansConfig(vocab_size=256, dim=args.dim, n_layers=args.layers, heads=args.heads, variant=args.variant,
                        window=args.window, chunk_size=args.chunk)


def byte_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, state=None):
    """(mean cross-entropy in nats per byte, the model's state after `inputs`); divide the
    loss by ln 2 for bits per byte."""
    logits, state = model(inputs, state)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()), state


@torch.no_grad()
def validation_bpb(model: TitansLM, corpus: ByteCorpus, args: argparse.Namespace, device: torch.device) -> float:
    """Bits per byte on `eval_batches` fixed batches of the validation split (the same every time)."""
    model.eval()
    losses = []
    for i in range(args.eval_batches):
        inputs, targets = corpus.batch(args.batch, args.seq_len, seed=10_000 + args.seed, step=i)
        with autocast(device):
            losses.append(byte_loss(model, inputs.to(device), targets.to(device))[0].item())
    model.train()
    return sum(losses) / len(losses) / LN2


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def schedule(args: argparse.Namespace):
    """Linear warm-up, then cosine decay to 10% of --lr."""
    def factor(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def save_plot(history: list[dict], path: Path) -> None:
    """The loss curve as a PNG. A bare Figure (no pyplot) draws without a display and leaves the
    backend of a notebook that called us alone."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot([h["step"] for h in history], [h["bpb"] for h in history], lw=1, label="train")
    valid = [h for h in history if "val_bpb" in h]
    ax.plot([h["step"] for h in valid], [h["val_bpb"] for h in valid], marker="o", label="validation")
    ax.set(xlabel="step", ylabel="bits per byte", title=path.parent.name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if args.batch % (world * args.accum):
        raise ValueError(f"--batch {args.batch} must split evenly into {world} processes x --accum {args.accum}")
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    first = rank == 0
    out = Path(args.out)
    if first:
        out.mkdir(parents=True, exist_ok=True)
        print(describe(), flush=True)

    train, valid = ByteCorpus("train"), ByteCorpus("valid")
    torch.manual_seed(args.seed)
    model = TitansLM(model_config(args)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(args))
    start, history = 0, []
    if args.resume:
        saved = torch.load(out / "checkpoint.pt", map_location=device, weights_only=True)
        if saved["config"] != model.config.to_dict():
            raise ValueError(f"{out / 'checkpoint.pt'} was trained with another model: {saved['config']}")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        start, history = saved["step"], saved["history"]
    # A carried state replaces the memory's initial weights, which then get no gradient: DDP must look for them.
    trained = DistributedDataParallel(model, find_unused_parameters=args.segments > 1) if world > 1 else model
    if first:
        print(f"{args.variant}: {model.num_parameters():,} parameters, {world} process(es), global batch "
              f"{args.batch} x {args.seq_len} bytes, steps {start}..{args.steps}", flush=True)

    rows = args.batch // world // args.accum  # rows per micro-batch on this process
    stop = args.steps if args.until is None else min(args.until, args.steps)
    bar = tqdm(range(start, stop), disable=not first or args.no_progress, desc=args.variant)
    clock, tokens = time.perf_counter(), 0
    states = [None] * args.accum  # one per micro-batch, carried between the windows of a stream
    model.train()
    for step in bar:
        inputs, targets = train.batch(args.batch, args.seq_len, seed=args.seed, step=step, segments=args.segments)
        stream_ends = (step + 1) % args.segments == 0
        mine = slice(rank * rows * args.accum, (rank + 1) * rows * args.accum)
        inputs, targets = inputs[mine].to(device), targets[mine].to(device)
        total = 0.0
        for micro in range(args.accum):
            part = slice(micro * rows, (micro + 1) * rows)
            last = micro == args.accum - 1  # DDP averages the gradients once, after the last micro-batch
            with trained.no_sync() if world > 1 and not last else contextlib.nullcontext():
                with autocast(device):
                    loss, state = byte_loss(trained, inputs[part], targets[part], states[micro])
                (loss / args.accum).backward()
            states[micro] = None if stream_ends else state.detach()
            total += loss.item() / args.accum
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        record = {"step": step + 1, "bpb": total / LN2}  # this process's share; printed by the first
        if torch.isfinite(norm):
            optimizer.step()
        else:  # the same on every process: DDP has averaged the gradients
            record["skipped"], states = True, [None] * args.accum
            if first:
                tqdm.write(f"step {step + 1}: gradient not finite (loss {total:.3f}); step skipped, streams restarted")
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += args.batch * args.seq_len
        if first and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            record["val_bpb"] = validation_bpb(model, valid, args, device)
        history.append(record)
        bar.set_postfix(bpb=f"{record['bpb']:.3f}", tok_s=f"{tokens / (time.perf_counter() - clock):,.0f}")
        if first and ((step + 1) % args.save_every == 0 or step + 1 == stop):
            torch.save({"config": model.config.to_dict(), "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "step": step + 1, "history": history, "args": vars(args)}, out / "checkpoint.pt")
            save_plot(history, out / "loss.png")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    val = next((h["val_bpb"] for h in reversed(history) if "val_bpb" in h), float("nan"))
    if first:
        skipped = sum(1 for h in history if h.get("skipped"))
        print(f"summary val_bpb={val:.4f} steps={args.steps} tokens={args.steps * args.batch * args.seq_len} "
              f"skipped={skipped}")
    return {"val_bpb": val, "history": history}


if __name__ == "__main__":
    main()

"""Speed and memory of the neural memory: chunked path vs per-token loop vs titans-pytorch.

One line per configuration: tokens/s of the forward pass (no grad) and of forward +
backward (loss = mean(y^2), gradients for every outer-loop parameter), and the peak
memory of each (in MiB, 2^20 bytes). Every measurement runs in a fresh subprocess, so runs do
not contaminate each other. Peak memory on CPU: the subprocess's ru_maxrss (the Python
interpreter, the imports and the peak sgemm's 48 MiB included); on CUDA:
torch.cuda.max_memory_allocated.

glibc and peak RSS: freed blocks stay in a fragmented heap, so the RSS peak of
allocation-heavy code exceeds its live tensors. It is worst where many small allocations
(an autograd graph's nodes) land between freed weight-sized tensors: glibc carves them out
of the freed blocks, which then no longer fit the next weight-sized tensor (torch asks for
64-byte-aligned blocks, a little more than the tensor), so the heap grows and every new page
is a page fault, system time (`chunked.ChunkGroup` says how our chunked path avoids
it). `--malloc-mmap-threshold 131072` runs every measurement subprocess (all
implementations, both passes) with MALLOC_MMAP_THRESHOLD_=131072: large blocks then go
straight back to the system, peaks drop, but every large allocation pays fresh page faults
and the speeds drop too (the per-token loop's most: it allocates weight-sized tensors every
token). The default is glibc's own setting; the first lines of the output say which was used,
and the glibc version.

--load starts one CPU-bound process (a Python busy loop) beside the benchmark and stops
it at the end: a learner's laptop is rarely idle. --memory-vs-T PNG measures only the
peak memory of forward + backward at T 1k-32k (dim 256, batch 4, chunk 64; one timed
call each, skipped where the estimate exceeds --max-gb or --max-seconds), ours and
titans-pytorch, fits the growth of the peak above the process's start (~ T^p) and plots
it.

Timing: a warm-up call on 2 chunks, then full-size calls (a first full-size call under
5 s counts as a warm-up too); the median of up to --repeats calls within --max-seconds.
Each line also gives the spread of the calls (fastest-slowest) and their system CPU time
over their user CPU time, and flags outputs (and gradients) that were not finite. Before each
timed call one sgemm (2048^2 on CPU, 8192^2 on CUDA) measures the matmul peak of that moment
(these machines' speed drifts with their neighbours'); a share of the peak is taken of the
higher of the run's start peak and the median of those.

Implementations, all a depth-2 memory MLP dim -> 4 dim -> dim, with the same dim and chunk:
    chunked                   ours, NeuralMemory(dim, depth=2, chunk_size=C, expansion=4)
    per_token                 ours, the same layer with sequential=True (the literal loop,
                              gradients at the chunk-start weights like `chunked`)
    titans-pytorch            titans_pytorch.NeuralMemory(dim, chunk_size=C,
                              model=MemoryMLP(dim, depth=2, expansion_factor=4.)), its other
                              settings at their defaults (as ours). Its default batch_size=None
                              takes every chunk's gradient at the sequence-start weights: less
                              sequential work than the mini-batch rule, and its faster setting.
                              The summary compares against this one.
    titans-pytorch-minibatch  the same with batch_size=C: the chunk-start weights of section
                              3.2, the algorithm `chunked` computes (full run only; it is
                              several times slower than its default).
titans-pytorch is optional (`pip install titans-pytorch`, not a dependency of titans-mini).

A measurement is skipped ("skipped") when its estimate exceeds --max-seconds or --max-gb:
time and memory extrapolated linearly in T from the same implementation's longest
measured T, and for the per-token backward an analytic memory estimate (its autograd
graph holds three or four weight-sized tensors per token, `per_token_backward_mb`).

The last line, for dim 256, batch 4, T 4096, chunk 64:
    summary speedup_vs_per_token=<x> speedup_vs_titans_pytorch=<y|na> memory_ratio_vs_titans_pytorch=<z|na>
            fwdbwd_peak_share=<s> fwdbwd_system_over_user=<r> load=<on|off>      (one line)
speedup_vs_per_token from the forward pass (in --quick the per-token loop is timed at a
shorter T and its tokens/s carried over: its cost per token does not depend on T; the
output says so); the titans-pytorch figures from forward + backward (our tokens/s / theirs,
our peak memory / theirs); fwdbwd_peak_share: our forward + backward's matmul rate (3x the
analytic forward count) over the matmul peak of the same run (`share_peak`); fwdbwd_system_over_user: the
system CPU time of those calls over their user CPU time; load: whether --load was on.

    python benchmarks/bench_memory.py --quick            # the summary only, ~1.5 min on 2 CPU cores
    python benchmarks/bench_memory.py --quick --load     # the same beside a CPU-bound process
    python benchmarks/bench_memory.py --memory-vs-T benchmarks/memory_vs_T.png   # ~3.5 min
    python -m benchmarks.bench_memory --json out.json    # the whole sweep (an hour or more on CPU)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

DIMS, BATCHES, STEPS, CHUNK = (64, 256), (1, 4), (256, 512, 1024, 2048, 4096, 8192), 64
SWEEP_STEPS = (1024, 2048, 4096, 8192, 16384, 32768)  # --memory-vs-T
SUMMARY = dict(dim=256, batch=4, steps=4096, chunk=CHUNK)
QUICK_PER_TOKEN_STEPS = 256  # --quick times the per-token loop at this T and carries its tokens/s over
QUICK_BUDGET_S = 30.0  # --quick: a further timed call only if the measurement stays within this
IMPLS = ("chunked", "per_token", "titans-pytorch", "titans-pytorch-minibatch")
PASSES = ("fwd", "fwdbwd")
WARM_LIMIT_S = 5.0  # a first full-size call shorter than this is discarded as a warm-up
MMAP_THRESHOLD = 0  # bytes; MALLOC_MMAP_THRESHOLD_ of the measurement subprocesses (0: glibc default)
MATMUL_N = {"cpu": 2048, "cuda": 8192}  # size of the square sgemm that measures the matmul peak


@dataclass(frozen=True)
class Config:
    impl: str  # one of IMPLS
    dim: int
    batch: int
    steps: int
    chunk: int


@dataclass
class Result:
    config: Config
    tok_s: dict[str, float | None] = field(default_factory=dict)  # pass -> tokens/s, None = not measured
    peak_mb: dict[str, float | None] = field(default_factory=dict)
    start_mb: dict[str, float] = field(default_factory=dict)  # the same before the first call
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of the whole measurement
    repeats: dict[str, int] = field(default_factory=dict)
    finite: dict[str, bool] = field(default_factory=dict)  # outputs (and gradients) all finite
    calls: dict[str, list[dict]] = field(default_factory=dict)  # every timed call: wall, user and system seconds
    note: str = ""


# ------------------------------------------------------------------- models
def titans_pytorch_available() -> bool:
    try:
        import titans_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def build(config: Config, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The module to run and the keyword arguments of its call."""
    if config.impl in ("chunked", "per_token"):
        from titans_mini import NeuralMemory

        model = NeuralMemory(config.dim, depth=2, chunk_size=config.chunk, expansion=4,
                             sequential=config.impl == "per_token")
        kwargs = {}
    elif config.impl in ("titans-pytorch", "titans-pytorch-minibatch"):
        from titans_pytorch import MemoryMLP
        from titans_pytorch import NeuralMemory as TitansNeuralMemory

        batch_size = config.chunk if config.impl == "titans-pytorch-minibatch" else None
        mlp = MemoryMLP(config.dim, depth=2, expansion_factor=4.0)
        model = TitansNeuralMemory(config.dim, chunk_size=config.chunk, batch_size=batch_size, model=mlp)
        kwargs = {}
    else:
        raise ValueError(f"impl must be one of {IMPLS}, got {config.impl!r}")
    return model.to(device), kwargs


# -------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def setup(threads: int) -> torch.device:
    from titans_mini.device import pick_device

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # decayed memory weights turn subnormal and slow the CPU down
    return pick_device()


def measure(config: Config, which: str, *, repeats: int = 3, budget_s: float = 90.0, device: torch.device | None = None) -> dict:
    """Tokens/s of one pass ("fwd" or "fwdbwd") of one configuration, in this process.

    Returns {"tok_s", "peak_mb", "seconds", "repeats", "finite", "calls"}: tokens/s of the
    median call; peak_mb is this process's peak so far (on CUDA: since this call began),
    start_mb the same before the first call (the interpreter, the imports and the model);
    calls, each timed call's wall, user and system seconds (CPU time of this process).
    """
    if which not in PASSES:
        raise ValueError(f"which must be one of {PASSES}, got {which!r}")
    device = device or torch.device("cpu")
    torch.manual_seed(0)
    model, kwargs = build(config, device)
    sgemm = sgemm_rate(device)  # before the start's figure, which then holds its operands too
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start_mb = _peak_mb(device)
    finite = True

    def run(steps: int) -> dict[str, float]:
        nonlocal finite
        x = torch.randn(config.batch, steps, config.dim, device=device)
        peak = sgemm()  # the matmul peak of this moment, just before the call
        _sync(device)
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        if which == "fwd":
            with torch.no_grad():
                y = model(x, **kwargs)[0]
        else:
            y = model(x, **kwargs)[0]
            y.square().mean().backward()
        _sync(device)
        elapsed = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        finite = finite and all(bool(torch.isfinite(t).all()) for t in [y, *grads])
        model.zero_grad(set_to_none=True)
        return {"wall": elapsed, "user": after.ru_utime - cpu.ru_utime, "sys": after.ru_stime - cpu.ru_stime, "peak_gflops": peak}

    began = time.perf_counter()
    run(min(config.steps, 2 * config.chunk))  # lazy initialisation, first-call overheads
    calls = [run(config.steps)]
    if calls[0]["wall"] < WARM_LIMIT_S:
        calls = [run(config.steps)]
    while len(calls) < repeats and time.perf_counter() - began + median(calls, "wall") < budget_s:
        calls.append(run(config.steps))
    return {
        "tok_s": config.batch * config.steps / median(calls, "wall"),
        "peak_mb": _peak_mb(device),
        "start_mb": start_mb,
        "seconds": time.perf_counter() - began,
        "repeats": len(calls),
        "finite": finite,
        "calls": calls,
    }


def median(calls: list[dict], key: str) -> float:
    return statistics.median(call[key] for call in calls)


def measure_in_subprocess(
    config: Config, which: str, *, repeats: int, budget_s: float, threads: int, mmap_threshold: int = MMAP_THRESHOLD
) -> dict:
    """`measure` in a fresh Python process, so its peak memory is this configuration's alone.

    mmap_threshold > 0 sets MALLOC_MMAP_THRESHOLD_ in that process (glibc); 0 leaves it unset.
    """
    job = json.dumps({"config": asdict(config), "which": which, "repeats": repeats, "budget_s": budget_s, "threads": threads})
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if mmap_threshold > 0:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", job], capture_output=True, text=True, env=env
    )
    if done.returncode != 0:
        raise RuntimeError(f"{config} {which} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    got = json.loads(done.stdout.strip().splitlines()[-1])
    if got["malloc_mmap_threshold"] != max(mmap_threshold, 0):  # the header prints this setting: check it held
        raise RuntimeError(f"the worker ran with MALLOC_MMAP_THRESHOLD_={got['malloc_mmap_threshold']}, expected {mmap_threshold}")
    return got


def sgemm_rate(device: torch.device):
    """A function timing one n x n float32 matmul, returning its GFLOP/s. Its operands and
    output are allocated once (3 n^2 floats: 48 MiB on CPU, 768 MiB on CUDA, held by every
    measurement and counted in its peak and in its start), so calling it between timed calls
    allocates nothing."""
    n = MATMUL_N.get(device.type, MATMUL_N["cpu"])
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    out = torch.empty_like(a)

    def rate() -> float:
        _sync(device)
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        _sync(device)
        return 2 * n**3 / (time.perf_counter() - start) / 1e9

    rate()  # warms up
    return rate


def matmul_peak_gflops(device: torch.device, repeats: int = 5) -> float:
    """The float32 matmul peak: the median speed of an n x n sgemm, in GFLOP/s."""
    rate = sgemm_rate(device)
    return statistics.median(rate() for _ in range(repeats))


# ------------------------------------------------------ flops and memory
def chunked_forward_flops(dim: int, batch: int, steps: int, chunk: int, depth: int = 2, expansion: int = 4) -> int:
    """Matmul flops (2 per multiply-add) of one forward of our NeuralMemory, chunked path.

    Counted from the code, per sequence of T tokens in n = ceil(T / b) chunks of b
    (widths w_0..w_L; a last, incomplete chunk is padded, read and not written):
        projections       2 T d (3d + 3)                    (q, k, v and the three gates)
        coefficients      2 b^2 (b + 1) per chunk           (F = D E, chunk_coefficients)
        per chunk, per layer l with P_l = w_l w_{l+1}:
          keys forward    2 b P_l                           (memory_activations)
          deltas          2 b P_l for l >= 1                (token_deltas)
          read            4 b P_l + 2 b^2 (w_l + w_{l+1})   (x W, x S, scores, scores @ delta)
          write           4 b P_l, full chunks only         (new M and new S)
    Elementwise work (scans, SiLU, gates) is left out. Tested against a count of the aten
    matmul calls. Forward + backward is counted as 3x this (the usual convention; the
    recomputation of checkpointed chunks is not counted as useful work).
    """
    widths = [dim] + [expansion * dim] * (depth - 1) + [dim]
    chunks, full = -(-steps // chunk), steps // chunk
    read = 2 * chunk**2 * (chunk + 1)
    write = 0
    for layer, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
        p = w_in * w_out
        read += 2 * chunk * p * (1 + (layer >= 1) + 2) + 2 * chunk**2 * (w_in + w_out)
        write += 4 * chunk * p
    return batch * (2 * steps * dim * (3 * dim + 3) + chunks * read + full * write)


def per_token_backward_mb(dim: int, batch: int, steps: int, expansion: int = 4) -> float:
    """Memory the per-token loop's autograd graph holds for backward: at most 4 weight-sized tensors a token.

    Per token and memory it keeps the new M_t and S_t and the surprise g_t (saved by
    theta_t * g_t): 3 weight-sized tensors, plus per-token activations; 4 is an upper
    bound for the skip guard (tests/test_bench.py checks it against the bytes left alive).
    """
    params = 2 * dim * expansion * dim
    return 4 * params * batch * steps * 4 / 2**20


# ---------------------------------------------------------------- output
def _fmt(value: float | None) -> str:
    return "skipped" if value is None else f"{value:.0f}"


def format_line(result: Result) -> str:
    c = result.config
    line = (
        f"impl={c.impl} dim={c.dim} batch={c.batch} T={c.steps} chunk={c.chunk} "
        f"fwd_tok_s={_fmt(result.tok_s.get('fwd'))} fwdbwd_tok_s={_fmt(result.tok_s.get('fwdbwd'))} "
        f"peak_mb_fwd={_fmt(result.peak_mb.get('fwd'))} peak_mb_fwdbwd={_fmt(result.peak_mb.get('fwdbwd'))}"
    )
    notes = [f"{which}: NON-FINITE outputs" for which, ok in result.finite.items() if not ok]
    for which, calls in result.calls.items():  # the spread of the calls and where their CPU time went
        walls = [call["wall"] for call in calls]
        spread = f"{len(calls)} calls {min(walls):.2f}-{max(walls):.2f} s" if len(calls) > 1 else f"1 call {walls[0]:.2f} s"
        notes.append(f"{which}: {spread}, system/user CPU {system_share(calls):.2f}")
    notes += [result.note] if result.note else []
    return line + (f"  # {'; '.join(notes)}" if notes else "")


LINE = re.compile(
    r"^impl=(?P<impl>[\w-]+) dim=(?P<dim>\d+) batch=(?P<batch>\d+) T=(?P<T>\d+) chunk=(?P<chunk>\d+) "
    r"fwd_tok_s=(?P<fwd>\d+|skipped) fwdbwd_tok_s=(?P<fwdbwd>\d+|skipped) "
    r"peak_mb_fwd=(?P<peak_fwd>\d+|skipped) peak_mb_fwdbwd=(?P<peak_fwdbwd>\d+|skipped)(  # .*)?$"
)
SUMMARY_LINE = re.compile(
    r"^summary speedup_vs_per_token=(?P<per_token>[\d.]+|na) "
    r"speedup_vs_titans_pytorch=(?P<titans>[\d.]+|na) memory_ratio_vs_titans_pytorch=(?P<memory>[\d.]+|na) "
    r"fwdbwd_peak_share=(?P<share>[\d.]+|na) fwdbwd_system_over_user=(?P<system>[\d.]+|na) load=(?P<load>on|off)$"
)


def _measured(results: list[Result], impl: str, dim: int, batch: int, chunk: int, which: str) -> list[Result]:
    return [
        r for r in results
        if (r.config.impl, r.config.dim, r.config.batch, r.config.chunk) == (impl, dim, batch, chunk) and r.tok_s.get(which)
    ]


def _find(results: list[Result], impl: str, dim: int, batch: int, steps: int, chunk: int, which: str) -> Result | None:
    found = [r for r in _measured(results, impl, dim, batch, chunk, which) if r.config.steps == steps]
    return found[0] if found else None


def system_share(calls: list[dict]) -> float:
    """System CPU seconds over user CPU seconds, over the calls (time in the kernel, mostly page faults)."""
    return sum(call["sys"] for call in calls) / max(sum(call["user"] for call in calls), 1e-9)


def share_peak(start_peak: float | None, calls: list[dict]) -> float | None:
    """The matmul peak a share is taken of: the higher of the run's start peak and the median
    of those measured just before each timed call (the machine's speed drifts with its
    neighbours; the higher peak gives the lower, safer share)."""
    between = [call["peak_gflops"] for call in calls if "peak_gflops" in call]
    return max([p for p in (start_peak, between and statistics.median(between)) if p], default=None)


def summary(results: list[Result], dim: int, batch: int, steps: int, chunk: int,
            peak_gflops: float | None = None, load: bool = False) -> tuple[str, list[str]]:
    """The summary line and notes on how each figure was obtained.

    peak_gflops: the matmul peak at the start of the run (the share our forward+backward
    reaches, from `chunked_forward_flops`, is `fwdbwd_peak_share`, of `share_peak`); load: whether a
    CPU-bound process ran beside (--load).
    """
    notes = []
    ours_fwd = _find(results, "chunked", dim, batch, steps, chunk, "fwd")
    ours_train = _find(results, "chunked", dim, batch, steps, chunk, "fwdbwd")
    peak_gflops = share_peak(peak_gflops, ours_train.calls.get("fwdbwd", []) if ours_train else [])
    per_token = _find(results, "per_token", dim, batch, steps, chunk, "fwd")
    if per_token is None:  # the loop's cost per token does not depend on T: carry over the longest T measured
        shorter = [r for r in _measured(results, "per_token", dim, batch, chunk, "fwd") if r.config.steps < steps]
        if shorter:
            per_token = max(shorter, key=lambda r: r.config.steps)
            notes.append(
                f"per-token forward at T={steps} ESTIMATED from its tok/s at T={per_token.config.steps} "
                f"(its cost per token is constant in T)"
            )
    titans = _find(results, "titans-pytorch", dim, batch, steps, chunk, "fwdbwd")

    def ratio(num: float | None, den: float | None) -> str:
        return "na" if num is None or den is None else f"{num / den:.2f}"

    speedup = ratio(ours_fwd and ours_fwd.tok_s["fwd"], per_token and per_token.tok_s["fwd"])
    vs_titans = ratio(ours_train and ours_train.tok_s["fwdbwd"], titans and titans.tok_s["fwdbwd"])
    memory = ratio(ours_train and ours_train.peak_mb["fwdbwd"], titans and titans.peak_mb["fwdbwd"])
    share = ratio(ours_train and 3 * chunked_forward_flops(dim, batch, steps, chunk) / (batch * steps)
                  * ours_train.tok_s["fwdbwd"] / 1e9, peak_gflops)
    system = f"{system_share(ours_train.calls['fwdbwd']):.2f}" if ours_train and ours_train.calls.get("fwdbwd") else "na"
    line = (f"summary speedup_vs_per_token={speedup} speedup_vs_titans_pytorch={vs_titans} "
            f"memory_ratio_vs_titans_pytorch={memory} fwdbwd_peak_share={share} fwdbwd_system_over_user={system} "
            f"load={'on' if load else 'off'}")
    return line, notes


# ------------------------------------------------------------------ plan
def estimate(config: Config, which: str, results: list[Result]) -> tuple[float | None, float | None]:
    """Seconds and MB a measurement would take, from the same impl's longest measured T."""
    seconds = megabytes = None
    earlier = _measured(results, config.impl, config.dim, config.batch, config.chunk, which)
    if earlier:
        last = max(earlier, key=lambda r: r.config.steps)
        scale = config.steps / last.config.steps
        seconds, megabytes = last.seconds[which] * scale, last.peak_mb[which] * scale
    if config.impl == "per_token" and which == "fwdbwd":
        megabytes = max(megabytes or 0.0, per_token_backward_mb(config.dim, config.batch, config.steps))
    return seconds, megabytes


def plan(quick: bool, have_titans: bool, sweep: bool = False) -> list[tuple[Config, tuple[str, ...]]]:
    """(configuration, passes to measure), smallest T first so skips can be estimated.
    sweep: forward + backward of the summary's configuration at every T of SWEEP_STEPS."""
    d, b, t, c = (SUMMARY[k] for k in ("dim", "batch", "steps", "chunk"))
    if sweep:
        impls = ("chunked", "titans-pytorch") if have_titans else ("chunked",)
        return [(Config(impl, d, b, steps, c), ("fwdbwd",)) for impl in impls for steps in SWEEP_STEPS]
    if quick:
        jobs = [(Config("chunked", d, b, t, c), PASSES), (Config("per_token", d, b, min(t, QUICK_PER_TOKEN_STEPS), c), ("fwd",))]
        if have_titans:
            jobs.append((Config("titans-pytorch", d, b, t, c), ("fwdbwd",)))
        return jobs
    impls = IMPLS if have_titans else IMPLS[:2]
    return [(Config(impl, dim, batch, steps, CHUNK), PASSES) for dim in DIMS for batch in BATCHES for impl in impls for steps in STEPS]


def start_load() -> subprocess.Popen:
    """--load: one CPU-bound process beside the benchmark (a learner's laptop is rarely idle)."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def growth_exponent(results: list[Result]) -> float:
    """p in (peak - start) ~ T^p, a least-squares fit on log-log axes over the measured T."""
    points = [(math.log(r.config.steps), math.log(r.peak_mb["fwdbwd"] - r.start_mb["fwdbwd"])) for r in results]
    mean_x, mean_y = (statistics.mean(xy[i] for xy in points) for i in (0, 1))
    return (sum((x - mean_x) * (y - mean_y) for x, y in points)
            / sum((x - mean_x) ** 2 for x, _ in points))


def plot_memory(results: list[Result], path: Path) -> None:
    """Peak memory of forward + backward against T, one line per implementation, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for impl in dict.fromkeys(r.config.impl for r in results):
        mine = [r for r in results if r.config.impl == impl]
        label = f"{impl} (above its start ~ T^{growth_exponent(mine):.2f})" if len(mine) > 1 else impl
        ax.plot([r.config.steps for r in mine], [r.peak_mb["fwdbwd"] / 1024 for r in mine], "o-", label=label)
    ax.set(xscale="log", yscale="log", xlabel="sequence length T (tokens)", ylabel="peak memory (GiB, log scale)",
           title="forward + backward, dim 256, batch 4, chunk 64")
    ax.set_xticks(SWEEP_STEPS, [f"{t // 1024}k" for t in SWEEP_STEPS])
    low, high = ax.get_ylim()
    low = min(low, 0.5)  # a labelled tick below the lowest point
    ax.set_ylim(low, high)
    ticks = [t for t in (0.25, 0.5, 1, 2, 4, 8, 16, 32, 64) if low <= t <= high]
    ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _load() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3]) if os.path.exists("/proc/loadavg") else "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only what the summary line needs (~1.5 min on 2 CPU cores)")
    parser.add_argument("--json", type=Path, help="also write every result to this JSON file")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per measurement at most (default 3)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    parser.add_argument("--max-seconds", type=float, default=90.0, help="skip a measurement estimated to take longer; repeat calls only within it (quick: within 30 s)")
    parser.add_argument("--max-gb", type=float, default=None, help="skip a measurement estimated to need more (default: 60%% of RAM)")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=MMAP_THRESHOLD, help="run every measurement subprocess with MALLOC_MMAP_THRESHOLD_=this many bytes (e.g. 131072): lower peak RSS, slower; default 0 = glibc's own setting")
    parser.add_argument("--no-titans", action="store_true", help="leave titans-pytorch out even when installed")
    parser.add_argument("--load", action="store_true", help="start one CPU-bound process beside the benchmark, stopped at the end")
    parser.add_argument("--memory-vs-T", type=Path, metavar="PNG", help="instead of the speeds: the peak memory of "
                        "forward+backward at T 1k-32k (dim 256, batch 4), ours and titans-pytorch, plotted to PNG")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:  # one measurement, in a fresh process: print its result as JSON
        job = json.loads(args.worker)
        device = setup(job["threads"])
        got = measure(Config(**job["config"]), job["which"], repeats=job["repeats"], budget_s=job["budget_s"], device=device)
        print(json.dumps({**got, "malloc_mmap_threshold": int(os.environ.get("MALLOC_MMAP_THRESHOLD_", 0))}))
        return 0
    load = start_load() if args.load else None
    try:
        return benchmark(args)
    finally:
        if load is not None:
            load.kill()
            load.wait()


def benchmark(args: argparse.Namespace) -> int:
    began = time.perf_counter()
    repeats = args.repeats or 3
    budget_s = min(args.max_seconds, QUICK_BUDGET_S) if args.quick else args.max_seconds  # time for repeated calls
    max_mb = 1024 * (args.max_gb or 0.6 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)
    device = setup(args.threads)
    have_titans = not args.no_titans and titans_pytorch_available()
    mmap = args.malloc_mmap_threshold
    libc = " ".join(platform.libc_ver()) or "libc unknown"
    print(f"# torch {torch.__version__} on {device}, {args.threads} threads, {libc}; peak memory = "
          + ("torch.cuda.max_memory_allocated" if device.type == "cuda" else "ru_maxrss of a fresh subprocess per measurement (imports included)"))
    print("# measurement subprocesses run with " + (
        f"MALLOC_MMAP_THRESHOLD_={mmap} for every implementation and pass (lower peak RSS, slower allocation)"
        if mmap > 0 else "glibc's default malloc settings (--malloc-mmap-threshold 131072 lowers peak RSS at a cost in speed)"))
    if have_titans:
        from importlib.metadata import version

        print(f"# titans-pytorch {version('titans-pytorch')}: its defaults (batch_size=None) with MemoryMLP(dim, depth=2, expansion_factor=4.)")
    else:
        print("# titans-pytorch: not installed (or --no-titans): its figures are na")
    print(f"# load average before: {_load()}" + ("; --load: one CPU-bound process runs beside" if args.load else ""))
    peak = matmul_peak_gflops(device)
    print(f"# float32 matmul peak: {peak:.0f} GFLOP/s ({MATMUL_N.get(device.type, MATMUL_N['cpu'])}^2 sgemm, median of 5)", flush=True)

    results = []
    sweep = args.memory_vs_T is not None
    if sweep:
        repeats = 1
    for config, passes in plan(args.quick, have_titans, sweep):
        result = Result(config)
        skips = []
        for which in PASSES:
            result.tok_s[which] = result.peak_mb[which] = None
            if which not in passes:
                continue
            seconds, megabytes = estimate(config, which, results)
            if (seconds or 0) > args.max_seconds or (megabytes or 0) > max_mb:
                skips.append(f"{which} skipped (estimated {seconds or 0:.0f} s, {megabytes or 0:.0f} MB)")
                continue
            got = measure_in_subprocess(config, which, repeats=repeats, budget_s=budget_s, threads=args.threads, mmap_threshold=mmap)
            result.tok_s[which], result.peak_mb[which] = got["tok_s"], got["peak_mb"]
            result.seconds[which], result.repeats[which], result.finite[which] = got["seconds"], got["repeats"], got["finite"]
            result.calls[which], result.start_mb[which] = got["calls"], got["start_mb"]
        result.note = "; ".join(skips)
        results.append(result)
        print(format_line(result), flush=True)
    if sweep:
        measured = [r for r in results if r.peak_mb["fwdbwd"] is not None]
        plot_memory(measured, args.memory_vs_T)
        for impl in dict.fromkeys(r.config.impl for r in measured):
            mine = [r for r in measured if r.config.impl == impl]
            if len(mine) > 1:
                print(f"# {impl}: peak memory above the process's start grows like T^{growth_exponent(mine):.2f} "
                      f"(least squares, T {mine[0].config.steps}-{mine[-1].config.steps})")
        print(f"# load average after: {_load()}; wall time {time.perf_counter() - began:.0f} s; plot: {args.memory_vs_T}")
        return 0

    d, b, t, c = (SUMMARY[k] for k in ("dim", "batch", "steps", "chunk"))
    flops = chunked_forward_flops(d, b, t, c)
    ours = _find(results, "chunked", d, b, t, c, "fwd"), _find(results, "chunked", d, b, t, c, "fwdbwd")
    for name, r, factor, which in (("forward", ours[0], 1, "fwd"), ("forward+backward", ours[1], 3, "fwdbwd")):
        if r is not None:
            rate = factor * flops / (b * t) * r.tok_s[which] / 1e9
            between = [call["peak_gflops"] for call in r.calls[which]]
            used = share_peak(peak, r.calls[which])
            print(f"# chunked dim {d} B{b} T{t} C{c} {name}: {rate:.0f} GFLOP/s = {100 * rate / used:.0f}% of the matmul peak "
                  f"({factor} x {flops / (b * t) / 1e6:.2f} MFLOP/token, analytic matmul count; peak {used:.0f} GFLOP/s, the higher of "
                  f"the run's start and the median of the sgemms just before each call, {min(between):.0f}-{max(between):.0f})")
    line, notes = summary(results, d, b, t, c, peak_gflops=peak, load=args.load)
    for note in notes:
        print(f"# {note}")
    if args.quick:
        print(f"# quick: at most {repeats} timed calls each, more only within {budget_s:.0f} s; titans-pytorch forward not measured")
    print(f"# load average after: {_load()}; wall time {time.perf_counter() - began:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({
            "device": str(device), "threads": args.threads, "torch": torch.__version__, "malloc_mmap_threshold": mmap,
            "matmul_peak_gflops": peak, "chunked_forward_flops_per_token": flops / (b * t),
            "results": [{**asdict(r.config), **{k: v for k, v in asdict(r).items() if k != "config"}} for r in results],
            "summary": line, "notes": notes,
        }, indent=1))
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

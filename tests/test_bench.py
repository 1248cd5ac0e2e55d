"""benchmarks/bench_memory.py: its logic, not its timings.

The flop count against the matmuls a forward really runs, the per-token memory estimate
against the bytes its autograd graph really holds, the skip and per-token estimates, the
--quick plan against what the summary needs, and one tiny end-to-end run whose last line
must be the summary. No assertion depends on how fast this machine is.
"""

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from titans_mini import NeuralMemory

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_memory.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_memory", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ counting
MATMULS = {"mm": (0, 1), "bmm": (0, 1), "addmm": (1, 2), "baddbmm": (1, 2), "addbmm": (1, 2)}
UNCOUNTED = {"mv", "addmv", "dot", "vdot", "matmul", "linear", "einsum", "_addmm_activation", "convolution"}


class MatmulFlops(TorchDispatchMode):
    """Counts 2 * multiply-adds of every aten matmul call (in-place variants included)."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__.rstrip("_")
        assert name not in UNCOUNTED, f"{name} reached the dispatcher: MatmulFlops would miss its flops"
        if name in MATMULS:
            i, j = MATMULS[name]
            self.flops += 2 * args[i].numel() * args[j].shape[-1]
        return func(*args, **(kwargs or {}))


class LiveBytes(TorchDispatchMode):
    """Remembers every tensor an op creates; `live()` sums the bytes still held somewhere."""

    def __init__(self):
        super().__init__()
        self.storages = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.storages[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
        return out

    def live(self) -> int:
        return sum(size for ref, size in self.storages.values() if not ref.expired())


@pytest.mark.parametrize("dim, chunk, steps, depth", [(8, 4, 16, 2), (12, 8, 32, 2), (8, 4, 18, 2), (6, 4, 12, 3), (8, 4, 3, 1)])
def test_analytic_flops_match_the_matmuls_the_forward_runs(bench, dim, chunk, steps, depth):
    """Including a last, incomplete chunk (read, not written) and a sequence shorter than a chunk."""
    torch.manual_seed(0)
    memory = NeuralMemory(dim, depth=depth, chunk_size=chunk, expansion=4)
    with torch.no_grad(), MatmulFlops() as counter:
        memory(torch.randn(3, steps, dim))
    assert counter.flops == bench.chunked_forward_flops(dim, 3, steps, chunk, depth=depth)


def test_sequential_memory_estimate_bounds_what_its_autograd_graph_holds(bench):
    torch.manual_seed(0)
    dim, batch, steps = 32, 2, 32
    memory = NeuralMemory(dim, depth=2, chunk_size=4, expansion=4, sequential=True)
    with LiveBytes() as tracker:
        y, state = memory(torch.randn(batch, steps, dim))
    held_mb = tracker.live() / 2**20
    estimate = bench.per_token_backward_mb(dim, batch, steps)
    assert 0.6 * estimate < held_mb <= estimate
    del y, state  # the graph was alive until here: what we measured was its memory


# ------------------------------------------------------------ plan and summary
def fake(bench, impl, steps, fwd=None, fwdbwd=None, peak=(None, None), seconds=(1.0, 1.0), dim=256, batch=4, chunk=64,
         calls=None, start=(0.0, 0.0)):
    return bench.Result(
        bench.Config(impl, dim, batch, steps, chunk),
        tok_s={"fwd": fwd, "fwdbwd": fwdbwd},
        peak_mb={"fwd": peak[0], "fwdbwd": peak[1]},
        start_mb={"fwd": start[0], "fwdbwd": start[1]},
        seconds={"fwd": seconds[0], "fwdbwd": seconds[1]},
        calls=calls or {},
    )


def test_summary_carries_the_per_token_speed_over_from_a_shorter_sequence_and_says_so(bench):
    ours = fake(bench, "chunked", 64, fwd=900.0, fwdbwd=300.0, peak=(10.0, 20.0), dim=8, batch=1, chunk=4)
    loop = fake(bench, "per_token", 16, fwd=100.0, peak=(5.0, None), dim=8, batch=1, chunk=4)
    longer = fake(bench, "per_token", 128, fwd=1.0, peak=(5.0, None), dim=8, batch=1, chunk=4)  # not shorter: ignored
    theirs = fake(bench, "titans-pytorch", 64, fwdbwd=150.0, peak=(None, 80.0), dim=8, batch=1, chunk=4)
    minibatch = fake(bench, "titans-pytorch-minibatch", 64, fwdbwd=15.0, peak=(None, 800.0), dim=8, batch=1, chunk=4)
    line, notes = bench.summary([ours, loop, longer, theirs, minibatch], dim=8, batch=1, steps=64, chunk=4)
    assert line == ("summary speedup_vs_per_token=9.00 speedup_vs_titans_pytorch=2.00 memory_ratio_vs_titans_pytorch=0.25 "
                    "fwdbwd_peak_share=na fwdbwd_system_over_user=na load=off")
    assert len(notes) == 1 and "ESTIMATED" in notes[0] and "T=16" in notes[0]


def test_summary_measured_at_the_same_length_needs_no_note_and_missing_figures_are_na(bench):
    ours = fake(bench, "chunked", 64, fwd=900.0, fwdbwd=300.0, peak=(10.0, 20.0))
    loop = fake(bench, "per_token", 64, fwd=300.0, peak=(5.0, None))
    line, notes = bench.summary([ours, loop], dim=256, batch=4, steps=64, chunk=64, load=True)
    assert line == ("summary speedup_vs_per_token=3.00 speedup_vs_titans_pytorch=na memory_ratio_vs_titans_pytorch=na "
                    "fwdbwd_peak_share=na fwdbwd_system_over_user=na load=on")
    assert notes == [] and bench.SUMMARY_LINE.match(line)


def test_summary_share_of_the_matmul_peak_and_system_time_come_from_the_training_pass(bench):
    """fwd+bwd counted as 3 forwards: at a peak of exactly that rate the share is 1; system time
    over user time is summed over the calls, not averaged per call."""
    calls = [{"wall": 1.0, "user": 2.0, "sys": 0.2}, {"wall": 1.0, "user": 1.0, "sys": 0.4}]
    ours = fake(bench, "chunked", 64, fwd=900.0, fwdbwd=300.0, peak=(10.0, 20.0), calls={"fwdbwd": calls})
    rate = 3 * bench.chunked_forward_flops(256, 4, 64, 64) / (4 * 64) * 300.0 / 1e9
    line, _ = bench.summary([ours], dim=256, batch=4, steps=64, chunk=64, peak_gflops=2 * rate)
    match = bench.SUMMARY_LINE.match(line)
    assert match["share"] == "0.50" and match["system"] == "0.20" and match["per_token"] == "na"
    # peaks timed just before the calls: the share is of the higher of those (their median) and the start's
    for peaks, share in (((4.0, 3.0, 5.0), "0.25"), ((1.0, 1.5, 0.5), "0.50")):
        timed = [dict(call, peak_gflops=p * rate) for call, p in zip(calls * 2, peaks)]
        ours = fake(bench, "chunked", 64, fwd=900.0, fwdbwd=300.0, peak=(10.0, 20.0), calls={"fwdbwd": timed})
        line, _ = bench.summary([ours], dim=256, batch=4, steps=64, chunk=64, peak_gflops=2 * rate)
        assert bench.SUMMARY_LINE.match(line)["share"] == share


@pytest.mark.parametrize("have_titans", [False, True])
def test_the_quick_plan_measures_exactly_what_the_summary_needs(bench, have_titans):
    jobs = bench.plan(quick=True, have_titans=have_titans)
    results = [fake(bench, c.impl, c.steps, **{w: 100.0 for w in passes}, peak=(50.0, 50.0)) for c, passes in jobs]
    line, notes = bench.summary(results, **bench.SUMMARY)
    match = bench.SUMMARY_LINE.match(line)
    assert match and match["per_token"] != "na"
    assert (match["titans"] != "na") == have_titans and (match["memory"] != "na") == have_titans
    per_token = [c for c, _ in jobs if c.impl == "per_token"]
    assert [c.steps for c in per_token] == [bench.QUICK_PER_TOKEN_STEPS] and len(notes) == 1
    assert {c.impl for c, _ in jobs} <= set(bench.IMPLS)


def test_the_memory_sweep_plans_forward_backward_at_every_length_and_fits_the_growth(bench):
    jobs = bench.plan(quick=False, have_titans=True, sweep=True)
    assert [(c.impl, c.steps) for c, _ in jobs] == [(i, t) for i in ("chunked", "titans-pytorch") for t in bench.SWEEP_STEPS]
    assert all(passes == ("fwdbwd",) and (c.dim, c.batch) == (256, 4) for c, passes in jobs)
    # peak = start + 3 sqrt(T): the fit must see the sqrt through the constant start
    results = [fake(bench, "chunked", t, fwdbwd=1.0, peak=(None, 250.0 + 3 * t**0.5), start=(None, 250.0)) for t in bench.SWEEP_STEPS]
    assert bench.growth_exponent(results) == pytest.approx(0.5)


def test_load_is_a_cpu_bound_process_and_it_is_stopped(bench):
    load = bench.start_load()
    try:
        time.sleep(1.0)
        stat = Path(f"/proc/{load.pid}/stat")
        ticks = stat.read_text().split()[13:15] if stat.exists() else None  # user and system CPU, 1/100 s
        assert load.poll() is None  # still running
        if ticks is not None:  # Linux: it has been computing most of that second, not sleeping
            assert sum(map(int, ticks)) > 30
    finally:
        load.kill()
        load.wait()


def test_the_full_plan_covers_the_sweep_with_every_implementation(bench):
    jobs = bench.plan(quick=False, have_titans=True)
    configs = {(c.impl, c.dim, c.batch, c.steps) for c, passes in jobs if passes == bench.PASSES}
    assert configs == {(i, d, b, t) for i in bench.IMPLS for d in (64, 256) for b in (1, 4) for t in (256, 512, 1024, 2048, 4096, 8192)}
    steps = [c.steps for c, _ in jobs if (c.impl, c.dim, c.batch) == ("chunked", 64, 1)]
    assert steps == sorted(steps)  # shortest first, so a longer one can be estimated from it


def test_estimates_scale_linearly_from_the_longest_measured_length(bench):
    short = fake(bench, "chunked", 256, fwd=1.0, fwdbwd=1.0, peak=(100.0, 300.0), seconds=(2.0, 5.0))
    longer = fake(bench, "chunked", 1024, fwd=1.0, fwdbwd=1.0, peak=(200.0, 400.0), seconds=(3.0, 8.0))
    config = bench.Config("chunked", 256, 4, 4096, 64)
    assert bench.estimate(config, "fwdbwd", [short, longer]) == (32.0, 1600.0)
    assert bench.estimate(config, "fwd", []) == (None, None)  # nothing measured yet: no estimate
    loop = bench.Config("per_token", 256, 4, 512, 64)
    seconds, megabytes = bench.estimate(loop, "fwdbwd", [])
    assert seconds is None and megabytes == pytest.approx(bench.per_token_backward_mb(256, 4, 512))


# ------------------------------------------------------------------- running
def test_lines_parse_and_flag_non_finite_outputs(bench):
    skipped = bench.Result(bench.Config("titans-pytorch", 8, 2, 32, 8), tok_s={"fwd": None, "fwdbwd": None}, peak_mb={"fwd": None, "fwdbwd": None})
    bad = fake(bench, "chunked", 32, fwd=10.0, fwdbwd=5.0, peak=(1.0, 2.0))
    bad.finite = {"fwd": True, "fwdbwd": False}
    match = bench.LINE.match(bench.format_line(skipped))
    assert match and match["fwd"] == "skipped" and match["impl"] == "titans-pytorch"
    line = bench.format_line(bad)
    assert bench.LINE.match(line) and "fwdbwd: NON-FINITE" in line and "fwd: NON" not in line


@pytest.mark.slow
def test_a_tiny_quick_run_ends_with_the_summary_line(bench, monkeypatch, capsys):
    """The whole --quick pipeline (subprocess workers included) at a toy size."""
    monkeypatch.setattr(bench, "SUMMARY", dict(dim=8, batch=2, steps=32, chunk=8))
    monkeypatch.setattr(bench, "QUICK_PER_TOKEN_STEPS", 16)
    monkeypatch.setattr(bench, "MATMUL_N", {"cpu": 256, "cuda": 256})
    assert bench.main(["--quick", "--no-titans", "--threads", "1", "--malloc-mmap-threshold", "131072"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    match = bench.SUMMARY_LINE.match(lines[-1])
    assert match and float(match["per_token"]) > 0 and match["titans"] == "na" and match["memory"] == "na"
    measured = [bench.LINE.match(line) for line in lines if line.startswith("impl=")]
    assert [(m["impl"], m["T"]) for m in measured] == [("chunked", "32"), ("per_token", "16")]
    assert all(m["fwd"] != "skipped" for m in measured) and measured[1]["fwdbwd"] == "skipped"
    assert 10 < float(measured[0]["peak_fwdbwd"]) < 4000  # a fresh process's RSS: torch imported, nothing more
    text = "\n".join(lines)
    assert "ESTIMATED" in text and "MALLOC_MMAP_THRESHOLD_=131072" in text and "% of the matmul peak" in text
    assert "the median of the sgemms just before each call" in text
    assert "fwdbwd: 3 calls" in lines[next(i for i, line in enumerate(lines) if line.startswith("impl=chunked"))]
    assert match["share"] != "na" and match["system"] != "na" and match["load"] == "off"


def test_it_runs_as_a_module_from_the_repo_root():
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_memory", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "--quick" in done.stdout


def test_bad_pass_and_impl_names_are_rejected(bench):
    with pytest.raises(ValueError, match="which"):
        bench.measure(bench.Config("chunked", 8, 1, 8, 4), "backward")
    with pytest.raises(ValueError, match="impl"):
        bench.build(bench.Config("nope", 8, 1, 8, 4), torch.device("cpu"))


def test_titans_pytorch_is_built_with_our_memory_shape(bench):
    pytest.importorskip("titans_pytorch")
    for impl in ("titans-pytorch", "titans-pytorch-minibatch"):
        model, kwargs = bench.build(bench.Config(impl, 8, 1, 16, 4), torch.device("cpu"))
        shapes = [tuple(w.shape) for w in model.memory_model.model.weights]
        assert shapes == [(8, 32), (32, 8)] and kwargs == {}  # depth 2, expansion 4, like ours
        assert model.chunk_size == 4 and model.batch_size == (4 if impl.endswith("minibatch") else None)
    got = bench.measure(bench.Config("titans-pytorch", 8, 2, 16, 4), "fwdbwd", repeats=1)
    assert got["finite"] and got["repeats"] == 1

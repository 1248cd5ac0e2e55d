"""Byte-level language modelling on the standard library: the corpus, and training on one
process or two (torchrun, DistributedDataParallel), with resume."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from titans_mini.models import TitansLM
from titans_mini.text import train as trainer
from titans_mini.text.data import EXCLUDED_FOLDERS, SEPARATOR, ByteCorpus, source_files, split_of, stdlib_root
from titans_mini.text.evaluate import continue_file, file_losses, loss_by_position
from titans_mini.text.train import model_config, parse_args

ROOT = Path(__file__).resolve().parents[1]


def test_the_split_is_by_path_disjoint_and_about_90_5_5():
    paths = source_files()
    assert paths == sorted(paths) and len(paths) > 300
    assert not any(EXCLUDED_FOLDERS & set(Path(p).parts[:-1]) for p in paths)
    assert any(p.startswith("json/") for p in paths)  # packages are in, only their test folders are out
    counts = {s: sum(split_of(p) == s for p in paths) for s in ("train", "valid", "test")}
    assert abs(counts["train"] / len(paths) - 0.9) < 0.05 and min(counts["valid"], counts["test"]) > 0.02 * len(paths)
    assert split_of("json/decoder.py") == split_of("json/decoder.py")  # a function of the path alone


def test_the_corpus_is_the_files_bytes_joined_by_a_separator():
    corpus = ByteCorpus("valid")
    first = (stdlib_root() / corpus.paths[0]).read_bytes()
    assert bytes(corpus.stream[:len(first)].tolist()) == first and corpus.stream[len(first)] == SEPARATOR
    assert len(corpus) == sum(len(f) + 1 for f in corpus.files)
    assert (corpus.stream == SEPARATOR).sum() == len(corpus.files)  # no NUL byte inside Python source


def test_batches_are_windows_of_the_stream_fixed_by_seed_and_step():
    corpus = ByteCorpus("valid")
    inputs, targets = corpus.batch(6, 40, seed=1, step=7)
    assert inputs.shape == targets.shape == (6, 40) and inputs.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    again, _ = corpus.batch(6, 40, seed=1, step=7)
    other, _ = corpus.batch(6, 40, seed=1, step=8)
    assert torch.equal(inputs, again) and not torch.equal(inputs, other)
    stream = bytes(corpus.stream.tolist())
    assert all(bytes(row.tolist()) in stream for row in inputs)
    with pytest.raises(ValueError, match="split"):
        ByteCorpus("validation")


def test_streamed_batches_read_on_from_a_file_start_piece_by_piece():
    corpus, n = ByteCorpus("valid"), 40
    pieces = [corpus.batch(5, n, seed=3, step=step, segments=3) for step in range(6)]
    file_starts = {0} | {i + 1 for i in (corpus.stream == SEPARATOR).nonzero().flatten().tolist()}
    stream = bytes(corpus.stream.tolist())
    for episode in (pieces[:3], pieces[3:]):
        rows = torch.cat([inputs for inputs, _ in episode], dim=1)  # (5, 3 * n): one stream per row
        assert torch.equal(torch.cat([t for _, t in episode], dim=1)[:, :-1], rows[:, 1:])
        for row in rows:
            found = stream.find(bytes(row.tolist()))
            assert found in file_starts  # (a row that begins like another file could be found there: none here)
    assert not torch.equal(pieces[0][0], pieces[3][0])  # a new episode, new files
    with pytest.raises(ValueError, match="segments"):
        corpus.batch(5, n, seed=3, step=0, segments=0)


TINY = ["--dim", "16", "--layers", "1", "--heads", "2", "--window", "8", "--chunk", "4", "--seq-len", "32",
        "--batch", "4", "--eval-every", "100", "--eval-batches", "1", "--no-progress", "--threads", "1"]


def train(out: Path, *extra: str, processes: int = 1) -> dict:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    done = subprocess.run([sys.executable, *launcher, "-m", "titans_mini.text.train", *TINY, "--out", str(out), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-1000:] + done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith("summary val_bpb=")
    return torch.load(out / "checkpoint.pt", weights_only=True)


def test_two_processes_with_ddp_reach_the_weights_of_one(tmp_path):
    """The same global batch of 8 streams of 3 windows, the state carried between them: one
    process, and two processes under torchrun (gloo) each in 2 micro-batches of 2 (DDP's
    no_sync, then one gradient average), each micro-batch carrying its own rows' state. Equal up
    to float rounding in the gradient's sums (measured 1.5e-8 after 3 AdamW steps; tolerance 1e-6)."""
    one = train(tmp_path / "one", "--steps", "3", "--batch", "8", "--segments", "3", "--save-every", "3")
    two = train(tmp_path / "two", "--steps", "3", "--batch", "8", "--segments", "3", "--save-every", "3",
                "--accum", "2", processes=2)
    for name, weight in one["model"].items():
        torch.testing.assert_close(two["model"][name], weight, rtol=0, atol=1e-6, msg=name)
    torch.manual_seed(0)
    start = TitansLM(model_config(parse_args(TINY))).embed.weight
    assert (one["model"]["embed.weight"] - start).abs().max() > 1e-4  # training moved the weights


def test_a_checkpoint_inside_a_stream_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(TINY + ["--segments", "4", "--steps", "6"])
    assert "--steps must be a multiple of --segments 4, got 6" in capsys.readouterr().err


@pytest.mark.parametrize("segments", ["1", "2"])
def test_resume_continues_exactly(tmp_path, segments):
    """Stopped after step 2 and resumed: the weights and losses of a run that never stopped.
    With streams of 2 windows the stop falls between two streams (the state starts fresh)."""
    straight = train(tmp_path / "straight", "--steps", "4", "--segments", segments, "--save-every", "2")
    train(tmp_path / "split", "--steps", "4", "--until", "2", "--segments", segments, "--save-every", "2")
    resumed = train(tmp_path / "split", "--steps", "4", "--resume", "--segments", segments, "--save-every", "2")
    assert resumed["step"] == straight["step"] == 4
    for name, weight in straight["model"].items():
        assert torch.equal(resumed["model"][name], weight), name
    assert [h["bpb"] for h in resumed["history"]] == [h["bpb"] for h in straight["history"]]


def test_a_step_whose_gradient_is_not_finite_is_skipped(tmp_path, monkeypatch, capsys):
    """The loss of step 2 made NaN: its step leaves the weights as step 1 left them, it is
    marked in the history and counted in the summary, and training goes on finite."""
    calls, byte_loss = [], trainer.byte_loss

    def poisoned(model, inputs, targets, state=None):
        loss, state = byte_loss(model, inputs, targets, state)
        calls.append(len(calls) + 1)
        return (loss * float("nan") if calls[-1] == 2 else loss), state

    clean = train(tmp_path / "clean", "--steps", "3", "--until", "1", "--save-every", "1")
    monkeypatch.setattr(trainer, "byte_loss", poisoned)
    trainer.main(TINY + ["--out", str(tmp_path / "poisoned"), "--steps", "3", "--until", "2", "--save-every", "1"])
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("skipped=1")
    poisoned_run = torch.load(tmp_path / "poisoned" / "checkpoint.pt", weights_only=True)
    assert [h["step"] for h in poisoned_run["history"] if h.get("skipped")] == [2]
    for name, weight in clean["model"].items():
        assert torch.equal(poisoned_run["model"][name], weight), name
    result = trainer.main(TINY + ["--out", str(tmp_path / "poisoned"), "--steps", "3", "--resume", "--save-every", "1"])
    assert all(torch.isfinite(w).all() for w in torch.load(tmp_path / "poisoned" / "checkpoint.pt",
                                                           weights_only=True)["model"].values())
    assert math.isfinite(result["val_bpb"])


def tiny_model(variant: str = "mac") -> TitansLM:
    torch.manual_seed(0)
    return TitansLM(model_config(parse_args(TINY + ["--variant", variant]))).eval()


@pytest.mark.parametrize("variant", ["mac", "transformer"])
def test_file_losses_are_the_whole_file_in_one_pass(variant):
    """Streaming a file in pieces gives the losses of one forward over the whole file."""
    model, data = tiny_model(variant), ByteCorpus("valid").files[0][:300]
    with torch.no_grad():
        logits, _ = model(data.long()[None, :-1])
    whole = torch.nn.functional.cross_entropy(logits[0], data.long()[1:], reduction="none")
    torch.testing.assert_close(file_losses(model, data, piece=37), whole, rtol=1e-4, atol=1e-4)


def test_a_transformer_cut_to_a_window_reads_short_files_alike_and_long_ones_not():
    """The benchmark's "windowed" Transformer: the same weights in a sliding-window model."""
    model = tiny_model("transformer")
    windowed = TitansLM(model.config.replace(variant="swa", window=32)).eval()
    windowed.load_state_dict(model.state_dict())  # strict: the two share every parameter
    data = ByteCorpus("valid").files[0][:200]
    short_full, short_cut = file_losses(model, data[:32]), file_losses(windowed, data[:32])
    assert torch.allclose(short_full, short_cut, atol=1e-5)  # no byte sees more than 32 back: nothing changes
    full, cut = file_losses(model, data), file_losses(windowed, data)
    assert torch.allclose(full[:31], cut[:31], atol=1e-5) and not torch.allclose(full[40:], cut[40:], atol=1e-3)


def test_loss_by_position_bins_every_predicted_byte_once():
    model, files = tiny_model(), [f[:n] for f, n in zip(ByteCorpus("valid").files, (300, 70, 1))]
    report = loss_by_position(model, files, bins=(0, 64, 256))
    assert report["bytes"] == 299 + 69 == sum(b["bytes"] for b in report["bins"])
    assert [b["bytes"] for b in report["bins"]] == [63 + 63, 192 + 6, 44]  # positions 1..63, 64..255, 256..299
    weighted = sum(b["bpb"] * b["bytes"] for b in report["bins"]) / report["bytes"]
    assert abs(weighted - report["bpb"]) < 1e-9


def test_continue_file_samples_from_the_state_of_the_whole_file():
    model, data = tiny_model(), ByteCorpus("valid").files[0][:200]
    greedy = continue_file(model, data, 5, temperature=0, piece=64)
    new, _ = model.generate(data.long()[None], 5)
    assert greedy == bytes(new[0].tolist()) and len(greedy) == 5


def test_the_language_model_benchmark_runs_and_ends_with_its_summary(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.stdlib_lm", "--quick", "--threads", "1",
                           "--runs", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("summary best=mac test_bpb=") and "=na" not in last, last
    assert " swa=" in last and " transformer_windowed=" in last and " transformer=" in last

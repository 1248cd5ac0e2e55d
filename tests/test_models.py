"""TitansLM: streaming equals whole, causality, generation, checkpoints, config validation."""

import pytest
import torch

from titans_mini.checkpoint import load_checkpoint, save_checkpoint
from titans_mini.config import VARIANTS, TitansConfig
from titans_mini.models import MemoryAsContext, TitansLM
from titans_mini.recall.training import passkey_accuracy, train_passkey

SMALL = dict(dim=32, n_layers=2, heads=2, window=8, chunk_size=4, n_persistent=2, memory_expansion=2)


def model(variant: str, seed: int = 0, **changes) -> TitansLM:
    torch.manual_seed(seed)
    return TitansLM(TitansConfig(variant=variant, **{**SMALL, **changes})).eval()


def ids(batch: int = 2, steps: int = 29, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TitansConfig().vocab_size, (batch, steps), generator=torch.Generator().manual_seed(seed))


# every variant at its defaults, and the two memory layers with the output gate switched the other way
VARIANTS_AND_GATES = [(v, None) for v in VARIANTS] + [("lmm", True), ("mal", False)]


@pytest.mark.parametrize("variant, gate", VARIANTS_AND_GATES)
def test_stream_in_pieces_equals_whole(variant, gate):
    lm, x = model(variant, memory_output_gate=gate), ids()
    with torch.no_grad():
        whole, _ = lm(x)
        pieces, state = [], None
        for start, stop in ((0, 5), (5, 6), (6, 19), (19, 29)):  # cuts inside segments and chunks
            logits, state = lm(x[:, start:stop], state)
            pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, 1), whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant, gate", VARIANTS_AND_GATES)
def test_causal_perturbing_the_future_leaves_the_past(variant, gate):
    lm, x = model(variant, memory_output_gate=gate), ids()
    t = 13  # inside MAC's second segment (window 8), not at its start
    changed = x.clone()
    changed[:, t] = (changed[:, t] + 1) % lm.config.vocab_size
    with torch.no_grad():
        before, _ = lm(x)
        after, _ = lm(changed)
    torch.testing.assert_close(after[:, :t], before[:, :t], atol=0, rtol=0)
    assert (after[:, t:] - before[:, t:]).abs().max() > 1e-4  # and the change is seen later


def test_mac_retrieval_is_causal_inside_a_segment():
    """Perturb a later token of a segment: the mixer's outputs before it do not move,
    although they share the segment (and its attention over retrieved memory)."""
    torch.manual_seed(0)
    mac = MemoryAsContext(TitansConfig(**SMALL)).eval()
    x = torch.randn(2, 16, SMALL["dim"])
    changed = x.clone()
    changed[:, 11] += 1.0  # second segment is tokens 8..15
    with torch.no_grad():
        y, _ = mac(x)
        y2, _ = mac(changed)
    torch.testing.assert_close(y2[:, :11], y[:, :11], atol=0, rtol=0)
    assert (y2[:, 11] - y[:, 11]).abs().max() > 1e-4


def test_mac_reads_memory_written_by_earlier_segments():
    """Changing a token of the first segment changes the second segment's output through
    the memory alone: attention does not cross segments."""
    torch.manual_seed(0)
    mac = MemoryAsContext(TitansConfig(**SMALL)).eval()
    x = torch.randn(1, 16, SMALL["dim"])
    changed = x.clone()
    changed[:, 2] += 1.0
    with torch.no_grad():
        y, _ = mac(x)
        y2, _ = mac(changed)
    assert (y2[:, 8:] - y[:, 8:]).abs().max() > 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_streaming_generate_equals_full_forward_greedy(variant):
    lm, prompt = model(variant), ids(steps=11)
    new, _ = lm.generate(prompt, 13)
    full = torch.cat([prompt, new], 1)
    with torch.no_grad():
        logits, _ = lm(full[:, :-1])
    assert torch.equal(logits[:, prompt.shape[1] - 1 :].argmax(-1), new)


@pytest.mark.parametrize("variant", VARIANTS)
def test_detached_state_stops_the_gradient_and_keeps_the_outputs(variant):
    """Truncated backpropagation through time: with `state.detach()` between two pieces, the
    second piece's outputs are unchanged, and its loss no longer reaches the embeddings of
    tokens that only the first piece read (it does without the cut)."""
    lm = model(variant).train()
    first = torch.randint(5, 70, (2, 12), generator=torch.Generator().manual_seed(1))
    second = torch.randint(80, 149, (2, 9), generator=torch.Generator().manual_seed(2))
    whole, _ = lm(torch.cat([first, second], 1))
    for cut in (False, True):
        lm.zero_grad()
        _, state = lm(first)
        logits, _ = lm(second, state.detach() if cut else state)
        torch.testing.assert_close(logits, whole[:, 12:], rtol=0, atol=1e-5)
        logits.pow(2).mean().backward()
        reached = lm.embed.weight.grad[first.unique()].abs().sum().item()
        assert (reached == 0) if cut else (reached > 0), (cut, reached)


def test_generate_continues_a_stream():
    lm, x = model("mac"), ids(steps=20)
    _, state = lm(x[:, :12])
    new_from_state, _ = lm.generate(x[:, 12:], 5, state=state)
    new_whole, _ = lm.generate(x, 5)
    assert torch.equal(new_from_state, new_whole)


@pytest.mark.parametrize("variant", VARIANTS)
def test_outer_loop_gradients_reach_every_parameter(variant):
    lm = model(variant).train()
    logits, _ = lm(ids(steps=20))
    logits.pow(2).mean().backward()
    missing = [n for n, p in lm.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"


def test_checkpoint_round_trip(tmp_path):
    lm = model("mag", seed=3)
    path = tmp_path / "m.pt"
    save_checkpoint(lm, path, steps=7)
    loaded, extra = load_checkpoint(path)
    assert loaded.config == lm.config and extra == {"steps": 7}
    for (name, a), (_, b) in zip(lm.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    x = ids()
    with torch.no_grad():
        assert torch.equal(lm(x)[0], loaded(x)[0])


def test_checkpoint_refuses_other_files(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not a titans-mini checkpoint"):
        load_checkpoint(path)


def test_attention_baselines_have_about_the_parameters_of_the_memory_variants():
    counts = {v: model(v).num_parameters() for v in VARIANTS}
    for baseline in ("swa", "transformer"):
        for variant in ("mac", "mag"):
            assert abs(counts[baseline] - counts[variant]) / counts[variant] < 0.05, counts


@pytest.mark.parametrize("variant, sees_the_start", [("swa", False), ("transformer", True)])
def test_full_attention_sees_the_whole_past_and_the_window_does_not(variant, sees_the_start):
    """Changing the first token moves the last output 40 tokens later only without a window
    (2 layers of window 8 reach 14 tokens back), and the full cache keeps every token."""
    lm, x = model(variant), ids(steps=40)
    changed = x.clone()
    changed[:, 0] = (x[:, 0] + 1) % lm.config.vocab_size
    with torch.no_grad():
        y, state = lm(x)
        y2, _ = lm(changed)
    assert ((y2[:, -1] - y[:, -1]).abs().max() > 1e-5) == sees_the_start
    kept = state.blocks[0].mixers[0].k.shape[2]
    assert kept == (40 if sees_the_start else lm.config.window - 1), kept


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(variant="rnn"), "variant"),
        (dict(dim=0), "dim"),
        (dict(heads=3), "heads"),
        (dict(dim=36, heads=4), "heads"),  # head size 9 is odd: rotary needs pairs
        (dict(window=12, chunk_size=8), "window"),  # MAC segment must be whole chunks
        (dict(n_persistent=-1), "n_persistent"),
        (dict(chunk_size=2.5), "chunk_size"),
        (dict(momentum="yes"), "momentum"),
        (dict(memory_output_gate="yes"), "memory_output_gate"),
    ],
)
def test_bad_config_is_refused(changes, match):
    with pytest.raises((ValueError, TypeError), match=match):
        TitansConfig(**changes)


def test_config_dict_round_trip_and_unknown_field():
    config = TitansConfig(variant="mal", window=24)
    assert TitansConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown TitansConfig fields"):
        TitansConfig.from_dict({**config.to_dict(), "widht": 3})


def test_bad_input_ids_are_refused():
    lm = model("lmm")
    with pytest.raises(TypeError, match="integer"):
        lm(torch.randn(2, 5))
    with pytest.raises(ValueError, match="batch"):
        lm(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size"):
        lm(torch.full((1, 3), 10_000))
    with pytest.raises(TypeError, match="TitansState"):
        lm(ids(), state=[None])
    with pytest.raises(ValueError, match="max_new_tokens"):
        lm.generate(ids(), 0)


@pytest.mark.slow
def test_swa_learns_passkey_inside_its_window_beyond_chance():
    """A real learning test: chance is 1/64; within the window SWA must recall."""
    torch.manual_seed(0)
    lm = TitansLM(TitansConfig(variant="swa", dim=64, heads=4, window=16, n_layers=2))
    train_passkey(lm, 250, distances=(2, 12), seq_len=20, batch_size=32, lr=3e-3, progress=False)
    assert passkey_accuracy(lm, 8, seq_len=20, n=256) > 0.5

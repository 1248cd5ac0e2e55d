"""Generated recall tasks: layout, targets, distance, reproducibility, rewards, errors."""

import pytest
import torch

from titans_mini.config import TitansConfig
from titans_mini.recall.tasks import (BOS, IGNORE, KEY, KEY0, QUERY, TOKENS, VALUE0, VOCAB_SIZE, N_VALUES,
                                      answer_accuracy, decode, encode, mqar_batch, passkey_batch,
                                      passkey_prompts, recall_reward)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_vocabulary_round_trip():
    assert len(TOKENS) == len(set(TOKENS)) == VOCAB_SIZE
    assert TOKENS[:5] == ["<pad>", "<bos>", "<key>", "<query>", "<eos>"]
    text = "<bos> f3 <key> k5 v9 <query> k5 v9 <eos>"
    assert decode(encode(text)) == text
    assert decode(torch.tensor(encode(text))) == text
    with pytest.raises(ValueError, match="vocabulary"):
        encode("<bos> k999")


@pytest.mark.parametrize("haystack", ["filler", "noise"])
@pytest.mark.parametrize("distance, n_pairs", [(1, 1), (2, 1), (10, 1), (7, 3), (10, 3), (40, 5)])
def test_passkey_layout(distance, n_pairs, haystack):
    seq_len = distance + 20
    batch = passkey_batch(32, distance, seq_len=seq_len, n_pairs=n_pairs, n_values=8, haystack=haystack,
                          generator=gen())
    ids, targets = batch["input_ids"], batch["targets"]
    assert ids.shape == targets.shape == (32, seq_len) and ids.dtype == torch.int64
    assert ((ids >= 0) & (ids < VOCAB_SIZE)).all() and (ids[:, 0] == BOS).all()
    needles = set()
    for row, tgt in zip(ids.tolist(), targets.tolist()):
        answer_at = [t for t, y in enumerate(tgt) if y != IGNORE]
        assert len(answer_at) == 1                           # loss only at the answer
        query = row.index(QUERY)
        assert answer_at == [query + 1] and row.count(QUERY) == 1
        key_markers = [t for t, tok in enumerate(row) if tok == KEY]
        assert len(key_markers) == n_pairs
        needle = [t + 2 for t in key_markers if row[t + 1] == row[query + 1]]
        assert len(needle) == 1                              # queried key is unique
        assert query - needle[0] == distance                 # distance respected
        assert tgt[query + 1] == row[needle[0]] == row[query + 2]
        assert VALUE0 <= tgt[query + 1] < VALUE0 + 8
        assert all(t < query for t in key_markers)           # distractors before the query
        needles.add(needle[0])
    assert len(needles) > 1                                  # positions vary


@pytest.mark.parametrize("distance, n_pairs", [(300, 1), (300, 9)])
def test_noise_haystack_never_leaks_the_needle(distance, n_pairs):
    """The noisy haystack holds every key and value token, yet the needle's key appears only at
    the needle and the question, and its value only at the needle and the answer; no
    distractor shares the needle's value."""
    ids = passkey_batch(64, distance, seq_len=distance + 40, n_pairs=n_pairs, haystack="noise", generator=gen(5))["input_ids"]
    for row in ids.tolist():
        query = row.index(QUERY)
        key, value = row[query + 1], row[query + 2]
        assert [t for t, tok in enumerate(row) if tok == key] == [query - distance - 1, query + 1]
        assert [t for t, tok in enumerate(row) if tok == value] == [query - distance, query + 2]
    seen = set(ids.flatten().tolist())
    assert set(range(KEY0, VALUE0 + N_VALUES)) <= seen                 # keys and values everywhere
    filler = passkey_batch(64, distance, seq_len=distance + 40, n_pairs=n_pairs, generator=gen(5))["input_ids"]
    pair_tokens = lambda x: ((x >= KEY0) & (x < VALUE0 + N_VALUES)).sum(1)  # noqa: E731
    assert (pair_tokens(filler) == 2 * n_pairs + 2).all()                  # the pairs and the question only
    assert (pair_tokens(ids) > distance // 2).all()


def test_passkey_reproducible():
    a = passkey_batch(8, 9, seq_len=30, n_pairs=2, generator=gen(3))
    b = passkey_batch(8, 9, seq_len=30, n_pairs=2, generator=gen(3))
    c = passkey_batch(8, 9, seq_len=30, n_pairs=2, generator=gen(4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["input_ids"], c["input_ids"])


@pytest.mark.parametrize("haystack", ["filler", "noise"])
def test_passkey_prompts(haystack):
    out = passkey_prompts(16, 7, prefix=3, haystack=haystack, generator=gen())
    prompts, answers = out["prompt_ids"], out["answers"]
    assert prompts.shape == (16, 3 + 7 + 5) and answers.shape == (16,)
    assert (prompts[:, -2] == QUERY).all()
    needle = 3 + 3
    assert (prompts[:, needle - 1] == prompts[:, -1]).all()   # same key as the query
    assert torch.equal(prompts[:, needle], answers)
    assert ((answers >= VALUE0) & (answers < VALUE0 + N_VALUES)).all()
    again = passkey_prompts(16, 7, prefix=3, haystack=haystack, generator=gen())
    assert torch.equal(again["prompt_ids"], prompts)


def test_mqar_layout():
    n_pairs, n_queries, gap = 6, 4, 3
    batch = mqar_batch(16, n_pairs, n_queries, gap=gap, generator=gen())
    ids, targets = batch["input_ids"], batch["targets"]
    assert ids.shape == targets.shape == (16, 2 + 2 * n_pairs + gap + 2 * n_queries)
    for row, tgt in zip(ids.tolist(), targets.tolist()):
        store = dict(zip(row[1:1 + 2 * n_pairs:2], row[2:2 + 2 * n_pairs:2]))
        assert len(store) == n_pairs and all(k >= KEY0 for k in store)   # distinct keys
        assert row[1 + 2 * n_pairs + gap] == QUERY
        answer_at = [t for t, y in enumerate(tgt) if y != IGNORE]
        assert len(answer_at) == n_queries
        assert len({row[t] for t in answer_at}) == n_queries             # distinct queries
        for t in answer_at:
            assert tgt[t] == store[row[t]] == row[t + 1]
    assert torch.equal(ids, mqar_batch(16, n_pairs, n_queries, gap=gap, generator=gen())["input_ids"])


def test_recall_reward():
    completions = torch.tensor([[5, 1], [7, 5], [5, 5], [9, 0]])
    answers = torch.tensor([5, 5, 5, 9])
    torch.testing.assert_close(recall_reward(completions, answers), torch.tensor([1.0, 0.0, 1.0, 1.0]))
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])   # float, as sampling gives
    torch.testing.assert_close(recall_reward(completions, answers, mask), torch.tensor([1.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(recall_reward(completions[:, :0], answers), torch.zeros(4))
    with pytest.raises(ValueError, match="answers"):
        recall_reward(completions, answers[:2])
    with pytest.raises(ValueError, match="completion_mask"):
        recall_reward(completions, answers, mask[:, :1])


def test_answer_accuracy():
    targets = torch.full((2, 4), IGNORE)
    targets[0, 1], targets[1, 3], targets[1, 0] = 3, 2, 1
    logits = torch.zeros(2, 4, 5)
    logits[0, 1, 3] = logits[1, 3, 0] = logits[1, 0, 1] = 1.0   # right, wrong, right
    logits[0, 0, 4] = 9.0                                       # ignored position
    torch.testing.assert_close(answer_accuracy(logits, targets), torch.tensor(2 / 3))
    with pytest.raises(ValueError, match="no answer"):
        answer_accuracy(logits, torch.full((2, 4), IGNORE))
    with pytest.raises(ValueError, match="logits"):
        answer_accuracy(logits[0], targets)


@pytest.mark.parametrize("call, name", [
    (lambda: passkey_batch(4, 0), "distance"),
    (lambda: passkey_batch(0, 5), "batch"),
    (lambda: passkey_batch(4, 5, seq_len=10), "seq_len"),
    (lambda: passkey_batch(4, 5, n_values=N_VALUES + 1), "n_values"),
    (lambda: passkey_batch(4, 5, n_keys=0), "n_keys"),
    (lambda: passkey_batch(4, 5, n_pairs=3), "n_pairs"),
    (lambda: passkey_prompts(4, 5, prefix=-1), "prefix"),
    (lambda: passkey_batch(4, 5, haystack="random"), "haystack"),
    (lambda: passkey_batch(4, 40, n_pairs=9, n_values=8, haystack="noise"), "n_pairs"),
    (lambda: mqar_batch(4, 0, 1), "n_pairs"),
    (lambda: mqar_batch(4, 3, 4), "n_queries"),
    (lambda: mqar_batch(4, 3, 2, gap=-1), "gap"),
    (lambda: mqar_batch(4, 65, 2), "n_pairs"),
])
def test_bad_arguments(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_non_int_argument():
    with pytest.raises(TypeError, match="distance"):
        passkey_batch(4, 2.5)


def test_the_default_model_vocabulary_is_the_tasks_vocabulary():
    """TitansConfig's default vocab_size is written as a number (the model does not import
    the tasks): it must stay the size of the tasks' vocabulary."""
    assert TitansConfig().vocab_size == VOCAB_SIZE == len(TOKENS)

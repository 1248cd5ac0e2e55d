"""TitansForCausalLM under transformers and TitansGRPOTrainer under TRL (the "hf" extra).

Offline: HF_HUB_OFFLINE=1, models are built here and saved to temporary folders.
"""
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

for _name in ("transformers", "trl", "datasets", "accelerate"):
    pytest.importorskip(_name, reason=f'{_name} is missing: the "hf" extra is not installed '
                                      '(pip install "titans-mini[hf]")')

from datasets import Dataset  # noqa: E402
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

from titans_mini import hf  # noqa: E402
from titans_mini.config import VARIANTS, TitansConfig  # noqa: E402
from titans_mini.models import TitansLM  # noqa: E402
from titans_mini.recall.tasks import EOS, KEY0, PAD, QUERY, VALUE0, decode, encode, passkey_prompts  # noqa: E402

torch.set_num_threads(1)
try:
    hf.check_trl_interface()
    TRL_MOVED = ""
except RuntimeError as err:  # reported once, by test_trl_is_a_tested_version
    TRL_MOVED = str(err)
needs_tested_trl = pytest.mark.skipif(bool(TRL_MOVED), reason="trl is not a tested version: see "
                                      "test_trl_is_a_tested_version")
# TRL 1.16 calls transformers' deprecated `is_gradient_checkpointing`; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


def tiny_lm(variant: str = "mac", seed: int = 0) -> TitansLM:
    torch.manual_seed(seed)
    config = TitansConfig(dim=16, n_layers=2, heads=2, variant=variant, window=8, n_persistent=2, chunk_size=4)
    return TitansLM(config).eval()


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(5, 149, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- packaging

def test_core_package_works_without_the_extra():
    """With transformers/trl unimportable, the core imports and runs; titans_mini.hf says what to install."""
    code = """
import sys
for name in ("transformers", "trl", "datasets", "accelerate", "tokenizers"):
    sys.modules[name] = None  # any import of them raises ImportError
import torch, titans_mini
from titans_mini import checkpoint, grpo, models
from titans_mini.recall import tasks, training
from titans_mini.config import TitansConfig
lm = models.TitansLM(TitansConfig(dim=16, n_layers=1, heads=2, window=8, chunk_size=4))
assert lm(torch.ones(1, 5, dtype=torch.long))[0].shape == (1, 5, tasks.VOCAB_SIZE)
try:
    import titans_mini.hf
except ImportError as err:
    assert "titans-mini[hf]" in str(err), err
else:
    raise AssertionError("titans_mini.hf imported without transformers")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


# ----------------------------------------------------------------------------- transformers model

def test_config_round_trip_and_validation():
    config = TitansConfig(dim=16, n_layers=3, heads=2, variant="mag", window=8)
    hf_config = hf.TitansHFConfig.from_titans(config)
    assert hf_config.to_titans() == config
    assert (hf_config.hidden_size, hf_config.num_hidden_layers, hf_config.num_attention_heads) == (16, 3, 2)
    assert (hf_config.pad_token_id, hf_config.eos_token_id) == (PAD, EOS)
    with pytest.raises(ValueError, match="variant"):
        hf.TitansHFConfig(variant="rnn")
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        hf.TitansHFConfig(tie_word_embeddings=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_load_round_trip_with_auto_classes(variant, tmp_path):
    lm = tiny_lm(variant)
    model = hf.TitansForCausalLM.from_titans(lm).eval()
    ids = random_ids(2, 11)
    with torch.no_grad():
        logits = model(ids).logits
        assert torch.equal(logits, lm(ids)[0])
        model.save_pretrained(tmp_path)
        hf.make_tokenizer().save_pretrained(tmp_path)
        assert (tmp_path / "model.safetensors").exists()

        config = AutoConfig.from_pretrained(tmp_path)
        assert isinstance(config, hf.TitansHFConfig) and config.to_titans() == lm.config
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, hf.TitansForCausalLM)
        saved, back = model.state_dict(), loaded.state_dict()
        assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved)
        # bit-equal weights; the logits may differ in the last bit because memory-mapped
        # tensors are not 64-byte aligned, so the CPU kernels take another summation order
        torch.testing.assert_close(loaded(ids).logits, logits, rtol=0, atol=1e-5)

        backbone = AutoModel.from_pretrained(tmp_path).eval()
        assert isinstance(backbone, hf.TitansModel)
        head = loaded.get_output_embeddings()
        torch.testing.assert_close(head(backbone(ids).last_hidden_state), logits, rtol=0, atol=1e-5)

    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    text = "<bos> <key> k3 v7 f1 <query> k3"
    assert tokenizer(text)["input_ids"] == encode(text)
    assert tokenizer.decode(encode(text)) == text
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.padding_side) == (PAD, EOS, "left")


def prompts_differing_in_the_first_token(lm: TitansLM, length: int, new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (1, length) prompts that differ in their first token only and whose greedy
    continuations of `new` tokens differ (the first such pair in a seeded search; an untrained
    model is sensitive to a distant token for some prompts only). A generate that continued
    from the last token alone would give both the same continuation: it must get one wrong."""
    for seed in range(50):
        row = random_ids(1, length, seed=seed)
        want = lm.generate(row, new)[0]
        for first in range(5, 13):
            other = torch.cat([torch.tensor([[first]]), row[:, 1:]], 1)
            if first != row[0, 0] and not torch.equal(lm.generate(other, new)[0], want):
                return row, other
    raise AssertionError(f"no {length}-token prompt in 50 depends on its first token: the test would not "
                         "notice a generate that drops the context")


def count_tokens_per_call(model: "hf.TitansForCausalLM") -> list[int]:
    """Record how many tokens each forward call of `model` reads (a list that fills as it runs)."""
    lengths, original = [], model.model.lm.hidden_states
    model.model.lm.hidden_states = lambda ids, state=None: (lengths.append(ids.shape[1]), original(ids, state))[1]
    return lengths


@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_keeps_the_prompt_from_its_first_token(variant, tmp_path):
    """Greedy HF `generate` equals `TitansLM.generate` on prompts whose continuation depends on
    their *first* token, so a generate that lost the cache between steps (and went on from the
    last token alone, as transformers 5.24 did with a `past_key_values`-only model) cannot
    pass. Unpadded, left-padded, and scored by TRL's log-prob path."""
    lm = tiny_lm(variant)
    model = hf.TitansForCausalLM.from_titans(lm).eval()
    new = 10
    (long, long_other), (short, _) = (prompts_differing_in_the_first_token(lm, n, new) for n in (11, 6))
    want = {"long": lm.generate(long, new)[0][0], "short": lm.generate(short, new)[0][0]}
    out = model.generate(long_other, max_new_tokens=new, do_sample=False, eos_token_id=None)
    assert torch.equal(out[0, 11:], lm.generate(long_other, new)[0][0])

    lengths = count_tokens_per_call(model)
    out = model.generate(long, max_new_tokens=new, do_sample=False, eos_token_id=None)
    assert torch.equal(out[0, :11], long[0]) and torch.equal(out[0, 11:], want["long"])
    assert lengths == [11] + [1] * (new - 1), "with the cache, generate must feed one new token per step"
    lengths.clear()
    out = model.generate(long, max_new_tokens=new, do_sample=False, eos_token_id=None, use_cache=False)
    assert torch.equal(out[0, 11:], want["long"])
    assert lengths == list(range(11, 11 + new)), "use_cache=False re-reads the whole sequence"

    ids = torch.cat([long, torch.cat([torch.full((1, 5), PAD), short], 1)])
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=None)
    assert torch.equal(out[0, 11:], want["long"]) and torch.equal(out[1, 11:], want["short"])

    # TRL scores the padded prompt + completion: log-probs equal TitansLM's on each unpadded row
    trainer = make_trainer(tmp_path, GRPOTrainer, lm=lm, temperature=1.0)
    full_mask = torch.cat([mask, torch.ones(2, new, dtype=mask.dtype)], 1)
    with torch.no_grad():
        logp, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, out, full_mask, new)
        for i, row in enumerate((long, short)):
            sequence = torch.cat([row[0], want["long" if i == 0 else "short"]])[None]
            expected = lm(sequence)[0].log_softmax(-1)[0, -new - 1:-1].gather(-1, sequence[0, -new:, None])[:, 0]
            torch.testing.assert_close(logp[i], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padding_gives_the_unpadded_rows(variant):
    lm = tiny_lm(variant)
    model = hf.TitansForCausalLM.from_titans(lm).eval()
    long, short = random_ids(1, 12, seed=2), random_ids(1, 7, seed=3)
    ids = torch.cat([long, torch.cat([torch.full((1, 5), PAD), short], 1)])
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(logits[0], lm(long)[0][0], rtol=0, atol=1e-5)
        torch.testing.assert_close(logits[1, 5:], lm(short)[0][0], rtol=0, atol=1e-5)
        assert torch.equal(logits[1, :5], torch.zeros_like(logits[1, :5]))  # pads are not read

        # right pads (TRL's completion padding) change nothing before them
        right = torch.cat([ids, torch.full((2, 3), PAD)], 1)
        right_mask = torch.cat([mask, torch.zeros(2, 3, dtype=mask.dtype)], 1)
        torch.testing.assert_close(model(right, attention_mask=right_mask).logits[:, :12], logits, rtol=0, atol=1e-5)


def test_bad_masks_and_inputs_are_refused():
    model = hf.TitansForCausalLM.from_titans(tiny_lm())
    ids = random_ids(2, 6)
    holey = torch.tensor([[1, 1, 0, 1, 1, 1], [1] * 6])
    with pytest.raises(ValueError, match="no holes"):
        model(ids, attention_mask=holey)
    with pytest.raises(ValueError, match="at least one real"):
        model(ids, attention_mask=torch.tensor([[0] * 6, [1] * 6]))
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(ids, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=torch.randn(2, 6, 16))
    with pytest.raises(ValueError, match="input_ids"):
        model(ids[0])
    with pytest.raises(TypeError, match="past_key_values"):
        model(ids, past_key_values=((torch.zeros(1),),))
    with pytest.raises(ValueError, match="beam search"):  # transformers' refusal: the state cannot be reordered
        model.generate(ids, max_new_tokens=2, num_beams=2)


def test_logits_to_keep_and_labels():
    model = hf.TitansForCausalLM.from_titans(tiny_lm()).eval()
    ids = random_ids(2, 9)
    with torch.no_grad():
        full = model(ids).logits
        assert torch.equal(model(ids, logits_to_keep=0).logits, full)
        assert torch.equal(model(ids, logits_to_keep=3).logits, full[:, -3:])
        assert torch.equal(model(ids, logits_to_keep=torch.tensor([0, 4])).logits, full[:, [0, 4]])
        with pytest.raises(ValueError, match="logits_to_keep"):
            model(ids, logits_to_keep=-1)
        labels = ids.clone()
        labels[:, :4] = -100
        want = torch.nn.functional.cross_entropy(full[:, 3:-1].flatten(0, 1), ids[:, 4:].flatten())
        torch.testing.assert_close(model(ids, labels=labels).loss, want)


# ----------------------------------------------------------------------------- data and reward

def test_passkey_dataset_and_reward():
    data = hf.passkey_dataset(32, (2, 6), seed=0)
    tokenizer = hf.make_tokenizer()
    rows = [tokenizer(p)["input_ids"] for p in data["prompt"]]
    assert {len(r) for r in rows} == {6 + 5}  # one length: TRL pads nothing
    for ids, answer in zip(rows, data["answer"]):
        assert ids[-2] == QUERY and KEY0 <= ids[-1] < VALUE0
        assert ids[ids.index(ids[-1]) + 1] == answer  # the value stored under the queried key
    rewards = hf.recall_reward_func([[5, 6], [9], []], answer=[5, 5, 5])
    assert rewards == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="distances"):
        hf.passkey_dataset(4, (6, 2))
    with pytest.raises(ValueError, match="n >= 1"):
        hf.passkey_dataset(0, (2, 6))


def test_wrappers_refuse_the_wrong_type():
    with pytest.raises(TypeError, match="lm must be a TitansLM"):
        hf.TitansForCausalLM.from_titans(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="config must be a TitansConfig"):
        hf.TitansHFConfig.from_titans({"dim": 16})


# ----------------------------------------------------------------------------- TRL

def make_trainer(tmp_path, trainer_class=hf.TitansGRPOTrainer, reward=hf.recall_reward_func, lm=None, **config):
    """A tiny model under a GRPO trainer; prompts of three lengths, so batches are left-padded."""
    torch.manual_seed(0)
    rows = {"prompt": [], "answer": []}
    for distance in (2, 4, 6):
        batch = passkey_prompts(2, distance, generator=torch.Generator().manual_seed(distance))
        rows["prompt"] += [decode(r) for r in batch["prompt_ids"]]
        rows["answer"] += batch["answers"].tolist()
    settings = dict(learning_rate=1e-2, per_device_train_batch_size=4, num_generations=4, max_completion_length=4,
                    max_steps=2, disable_tqdm=True, seed=0, temperature=1.5)
    args = hf.grpo_config(str(tmp_path), **{**settings, **config})
    model = hf.TitansForCausalLM.from_titans(tiny_lm() if lm is None else lm)
    return trainer_class(model=model, processing_class=hf.make_tokenizer(), reward_funcs=reward, args=args,
                         train_dataset=Dataset.from_dict(rows))


def generation_batch(trainer, n_prompts: int = 3) -> list[dict]:
    rows = [trainer.train_dataset[2 * i] for i in range(n_prompts)]  # distances 2, 4, 6
    return [row for row in rows for _ in range(trainer.num_generations)]


def varied_reward(completion_ids, **kwargs):
    """A dense reward, so that advantages are not all zero on an untrained model."""
    return [float(sum(ids) % 7) for ids in completion_ids]


@needs_tested_trl
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "bnpo", "dr_grpo"])
def test_loss_and_gradient_equal_trl(loss_type, tmp_path):
    """On the same batch TitansGRPOTrainer (titans_mini.grpo) and TRL's GRPOTrainer give the same
    loss and gradient: ratios off 1 and clipped, KL with its bias correction, left-padded
    prompts, completions of different lengths, gradient accumulation."""
    trainer = make_trainer(tmp_path, loss_type=loss_type, gradient_accumulation_steps=2)
    model = trainer.model.train()
    inputs = trainer._generate_and_score_completions(generation_batch(trainer))
    assert not inputs["prompt_mask"].bool().all(), "the batch should hold left-padded prompts"
    g = torch.Generator().manual_seed(0)
    mask = inputs["completion_mask"]
    mask[0, 1:], mask[5, 3:] = 0, 0
    inputs["num_items_in_batch"] = mask.sum()
    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        logp, _, _ = trainer._get_per_token_logps_and_entropies(
            model, ids, torch.cat([inputs["prompt_mask"], mask], 1), mask.shape[1])
    inputs["old_per_token_logps"] = logp + 0.3 * torch.randn(logp.shape, generator=g)
    inputs["ref_per_token_logps"] = logp + 0.2 * torch.randn(logp.shape, generator=g)
    inputs["advantages"] = torch.randn(mask.shape[0], generator=g)
    trainer.beta = 0.04
    trainer.current_gradient_accumulation_steps = 2
    assert trainer.args.use_bias_correction_kl and trainer.args.steps_per_generation == 2

    params = [p for p in model.parameters() if p.requires_grad]
    ours = trainer._compute_loss(model, inputs)
    clipped = trainer._metrics["train"]["clip_ratio/region_mean"][-1]
    theirs = GRPOTrainer._compute_loss(trainer, model, inputs)
    assert clipped > 0, "the batch should exercise the clipped branch"
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    for a, b in zip(torch.autograd.grad(ours, params), torch.autograd.grad(theirs, params)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@needs_tested_trl
def test_advantages_equal_trl(tmp_path):
    trainer = make_trainer(tmp_path, reward=varied_reward)
    trainer.model.train()
    batch = generation_batch(trainer)
    torch.manual_seed(1)
    theirs = GRPOTrainer._generate_and_score_completions(trainer, batch)
    torch.manual_seed(1)
    ours = trainer._generate_and_score_completions(batch)
    assert torch.equal(ours["completion_ids"], theirs["completion_ids"])
    assert ours["advantages"].abs().sum() > 1  # not a trivial all-zero case
    torch.testing.assert_close(ours["advantages"], theirs["advantages"], rtol=0, atol=1e-5)


@pytest.mark.slow
@needs_tested_trl
@pytest.mark.parametrize("trainer_class", [GRPOTrainer, hf.TitansGRPOTrainer])
def test_trl_training_steps_run_and_update(trainer_class, tmp_path):
    trainer = make_trainer(tmp_path, trainer_class, reward=varied_reward)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    logs = [log for log in trainer.state.log_history if "reward" in log]
    assert len(logs) == 2 and all(log["completions/mean_length"] > 0 for log in logs)
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_trl_is_a_tested_version(tmp_path):
    """The one test that fails, with the installed and the tested versions, when trl moved
    (the TitansGRPOTrainer tests below are skipped then, rather than failing one by one)."""
    hf.check_trl_interface()
    hf.check_trl_interface(make_trainer(tmp_path))


@pytest.mark.parametrize("change", ["version", "signature"])
def test_untested_trl_fails_at_start_up_naming_the_versions(change, tmp_path, monkeypatch):
    if change == "version":
        monkeypatch.setattr(hf.trl, "__version__", "1.17.0")
    else:
        monkeypatch.setattr(GRPOTrainer, "_compute_loss", lambda self, model, inputs, extra: None)
    with pytest.raises(RuntimeError, match=r"trl>=1\.16\.0,<1\.17") as info:
        make_trainer(tmp_path)
    message = str(info.value)
    assert f"installed: trl {hf.trl.__version__}" in message and "tested with trl 1.16.0" in message
    assert ("outside the tested range" if change == "version" else "_compute_loss") in message


@needs_tested_trl
def test_unsupported_trl_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="scale_rewards"):
        make_trainer(tmp_path, scale_rewards="batch")
    with pytest.raises(ValueError, match="loss_type"):
        make_trainer(tmp_path, loss_type="sapo")

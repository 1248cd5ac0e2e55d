"""Fine-tune a tiny Titans model with Hugging Face TRL's GRPOTrainer on passkey recall.

    python examples/trl_grpo.py                  # variant "lmm", trl.GRPOTrainer (TRL's own loss)
    python examples/trl_grpo.py --variant mac    # any TitansConfig variant: mac mag mal lmm swa
    python examples/trl_grpo.py --ours           # TitansGRPOTrainer: the loss of titans_mini.grpo

Needs the "hf" extra (pip install "titans-mini[hf]"); runs offline, on a 2-core CPU in about
half a minute. Steps: pre-train a TitansLM briefly with the supervised passkey loss (so some
sampled answers are right and GRPO has a signal), wrap it as a TitansForCausalLM, save it
beside its tokenizer and reload both with the Auto classes, then GRPO with a 0/1 reward: is
the first completion token the value stored under the queried key? The reward rises.

The default "lmm" is the long-term memory alone (no attention), so whatever it recalls, its
memory recalled. Prompts are at most 13 tokens, inside the attention window (16) of the
other variants: with them, attention alone can solve the task.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never reach for the Hub

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
from trl import GRPOTrainer

from titans_mini.config import VARIANTS, TitansConfig
from titans_mini.device import pick_device, seed_everything
from titans_mini.hf import (TitansForCausalLM, TitansGRPOTrainer, grpo_config, make_tokenizer, passkey_dataset,
                            recall_reward_func)
from titans_mini.models import TitansLM
from titans_mini.recall.tasks import passkey_length
from titans_mini.recall.training import passkey_accuracy, train_passkey

DISTANCES = (2, 8)  # passkey distances, as in pre-training
SEQ_LEN = passkey_length(DISTANCES[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, default="lmm", help="TitansConfig.variant (default: lmm)")
    parser.add_argument("--ours", action="store_true", help="use TitansGRPOTrainer (titans_mini.grpo's loss)")
    parser.add_argument("--pretrain-steps", type=int, default=250)
    parser.add_argument("--grpo-steps", type=int, default=100)
    args = parser.parse_args()
    if args.pretrain_steps < 1 or args.grpo_steps < 20:
        parser.error("need --pretrain-steps >= 1 and --grpo-steps >= 20 (the reward is averaged over 10 steps)")
    device = pick_device()
    if device.type == "cpu":
        torch.set_num_threads(1)  # a tiny model: more threads only add synchronisation
    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bars
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # TRL calls a deprecated name
    seed_everything(0)
    t0 = time.perf_counter()

    # 1. A tiny model, pre-trained briefly: its greedy answer is often right, a sampled one
    #    (temperature 1, as GRPO samples) less often
    lm = TitansLM(TitansConfig(dim=32, n_layers=1, heads=2, variant=args.variant, window=16, chunk_size=8)).to(device)
    train_passkey(lm, args.pretrain_steps, distances=DISTANCES, seq_len=SEQ_LEN, lr=1e-2, progress=False)
    before = [passkey_accuracy(lm, d, seq_len=SEQ_LEN) for d in DISTANCES]
    print(f"{args.variant}: pre-trained {lm.num_parameters():,} parameters in {time.perf_counter() - t0:.0f} s; "
          f"greedy accuracy at distances {DISTANCES}: {before[0]:.2f}, {before[1]:.2f}")

    # 2. Wrap, save beside its tokenizer, reload with the Auto classes (as TRL would from a path)
    folder = tempfile.mkdtemp(prefix="titans-grpo-")
    TitansForCausalLM.from_titans(lm).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)

    # 3. GRPO: 16 prompts x 8 sampled answers (one token) per step, reward 1 for the right value;
    #    a constant learning rate (the Trainer's default decays it linearly to 0)
    config = grpo_config(folder, learning_rate=3e-3, lr_scheduler_type="constant", per_device_train_batch_size=128,
                         num_generations=8, max_completion_length=1, max_steps=args.grpo_steps, disable_tqdm=True,
                         seed=0)
    trainer_class = TitansGRPOTrainer if args.ours else GRPOTrainer
    trainer = trainer_class(model=model, processing_class=tokenizer, reward_funcs=recall_reward_func, args=config,
                            train_dataset=passkey_dataset(4096, DISTANCES))
    trainer.remove_callback(PrinterCallback)  # no log line per step: we print a summary instead
    t1 = time.perf_counter()
    trainer.train()
    rewards = [log["reward"] for log in trainer.state.log_history if "reward" in log]
    after = [passkey_accuracy(model.to_titans(), d, seq_len=SEQ_LEN) for d in DISTANCES]
    k = 10
    print(f"{trainer_class.__name__}: {len(rewards)} steps in {time.perf_counter() - t1:.0f} s; mean sampled reward "
          f"first {k} steps {sum(rewards[:k]) / k:.2f} -> last {k} steps {sum(rewards[-k:]) / k:.2f}")
    print(f"greedy accuracy at distances {DISTANCES}: {before[0]:.2f}, {before[1]:.2f} -> "
          f"{after[0]:.2f}, {after[1]:.2f}; total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()

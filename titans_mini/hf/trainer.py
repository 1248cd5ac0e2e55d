"""GRPO with TRL: a config for small models, and `trl.GRPOTrainer` with the math of `titans_mini.grpo`.

    grpo_config          a trl.GRPOConfig for small models (fp32, no gradient checkpointing, no reporting)
    TitansGRPOTrainer    trl.GRPOTrainer whose advantages and loss come from `titans_mini.grpo`
    check_trl_interface  the start-up check that the installed trl is one TitansGRPOTrainer was tested with
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch
import transformers
import trl
from packaging.version import Version
from torch import Tensor, nn
from trl import GRPOConfig, GRPOTrainer

from ..device import pick_device
from ..grpo import aggregate, clipped_surrogate, group_advantages, k3_kl, masked_mean, token_log_probs

# The versions `make test` installs (requirements-lock.txt; tests/test_packaging.py keeps both equal).
TESTED_VERSIONS = {"transformers": "5.24.0", "trl": "1.16.0", "datasets": "5.2.0", "accelerate": "1.15.0"}
# TitansGRPOTrainer overrides private GRPOTrainer methods: it runs only on the trl releases
# tested with it (TitansForCausalLM uses transformers' public interface only).
TRL_TESTED_RANGE = (">=1.16.0", "<1.17")


def grpo_config(output_dir: str, **overrides: Any) -> GRPOConfig:
    """A `trl.GRPOConfig` that suits a small TitansForCausalLM on any device; `overrides` win.

    TRL's defaults target billion-parameter models on GPUs. We set: fp32 (bf16=False: the
    memory's inner loop runs in fp32 anyway), no gradient checkpointing (TitansLM has its
    own, `TitansConfig.checkpoint_memory`), `use_cpu` when `pick_device()` is the CPU, no
    reporting and no checkpoints. Still TRL's: lr 1e-6 (tiny models need ~1e-3), 8
    generations per prompt, 512 completion tokens; set them for your task.
    """
    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    no_checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    settings = {"output_dir": output_dir, "bf16": False, no_checkpointing: False,
                "use_cpu": pick_device().type == "cpu", "report_to": "none", "save_strategy": "no",
                "logging_steps": 1}
    return GRPOConfig(**{**settings, **overrides})


# --------------------------------------------------------------------------- GRPO under TRL

# What TitansGRPOTrainer relies on in trl.GRPOTrainer: methods with these parameters ...
_TRL_METHODS = {
    "_compute_loss": ["self", "model", "inputs"],
    "_calculate_rewards": ["self", "inputs", "prompts", "completions", "completion_ids_list"],
    "_generate_and_score_completions": ["self", "inputs"],
}
# ... attributes its __init__ sets, and GRPOConfig fields.
_TRL_ATTRIBUTES = ("epsilon_low", "epsilon_high", "beta", "loss_type", "temperature", "num_generations",
                   "max_completion_length", "reward_weights", "scale_rewards", "multi_objective_aggregation",
                   "importance_sampling_level", "top_entropy_quantile", "off_policy_mask_threshold", "use_vllm",
                   "tools", "_entropy_bonus_enabled", "_metrics", "accelerator")
_TRL_CONFIG_FIELDS = ("delta", "use_bias_correction_kl", "steps_per_generation")
_SUPPORTED_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo")


def check_trl_interface(trainer: GRPOTrainer | None = None) -> None:
    """Raise one RuntimeError, naming the installed and the tested versions, if the installed
    trl is outside `TRL_TESTED_RANGE` or moved what TitansGRPOTrainer overrides.

    Called when a TitansGRPOTrainer is built: an untested trl fails there, once, rather than
    deep inside a training step (or, worse, trains on a silently different loss).
    """
    low, high = (Version(bound.lstrip("<>=")) for bound in TRL_TESTED_RANGE)
    installed = Version(trl.__version__)
    problems = [] if low <= installed < high else [f"trl {installed} is outside the tested range "
                                                   f"{','.join(TRL_TESTED_RANGE)}"]
    for name, params in _TRL_METHODS.items():
        method = getattr(GRPOTrainer, name, None)
        if method is None:
            problems.append(f"GRPOTrainer.{name} is gone")
        elif list(inspect.signature(method).parameters) != params:
            problems.append(f"GRPOTrainer.{name}{inspect.signature(method)} is not ({', '.join(params)})")
    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    problems += [f"GRPOConfig has no field {f}" for f in _TRL_CONFIG_FIELDS if f not in fields]
    if trainer is not None:
        problems += [f"GRPOTrainer has no attribute {a}" for a in _TRL_ATTRIBUTES if not hasattr(trainer, a)]
    if problems:
        raise RuntimeError(
            f"TitansGRPOTrainer overrides private methods of trl.GRPOTrainer and was tested with trl "
            f"{TESTED_VERSIONS['trl']} (transformers {TESTED_VERSIONS['transformers']}); installed: trl "
            f"{trl.__version__}, transformers {transformers.__version__}. " + "; ".join(problems)
            + f'. Install a tested trl: pip install "trl{",".join(TRL_TESTED_RANGE)}" (or use trl\'s own '
            "GRPOTrainer with TitansForCausalLM)")


class TitansGRPOTrainer(GRPOTrainer):
    """trl.GRPOTrainer with the GRPO math of `titans_mini.grpo`.

    TRL keeps everything around the math: sampling with `generate`, reward functions,
    batching, the optimiser, logging. We compute
      advantages  A_i = (r_i - mean_group r) / (std_group r + 1e-4)      `group_advantages`
      per token   -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)    `clipped_surrogate`
                  + beta * k3 KL to the reference policy                 `k3_kl`
      reduction   grpo / dr_grpo / dapo (bnpo: dapo over the micro-batch) `aggregate`
    with log pi(o_t | q, o_<t) from the model's own logits (TRL uses a fused head over the
    backbone). tests/test_hf.py checks that loss and gradient equal TRL's on the same batch.

    Supported: loss_type in grpo, bnpo, dr_grpo, dapo; scale_rewards="group"; token-level
    importance sampling; use_bias_correction_kl (KL weighted by rho, as TRL does); not vLLM,
    tools, entropy masks or bonus, off-policy masks, two-sided clipping (delta).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        check_trl_interface()
        super().__init__(*args, **kwargs)
        check_trl_interface(self)
        unsupported = {
            "loss_type": self.loss_type not in _SUPPORTED_LOSSES,
            "scale_rewards": self.scale_rewards != "group",
            "multi_objective_aggregation": self.multi_objective_aggregation != "sum_then_normalize",
            "importance_sampling_level": self.importance_sampling_level != "token",
            "top_entropy_quantile": self.top_entropy_quantile < 1.0,
            "off_policy_mask_threshold": self.off_policy_mask_threshold is not None,
            "use_vllm": self.use_vllm,
            "tools": bool(self.tools),
            "entropy_coef": self._entropy_bonus_enabled,
            "delta": self.args.delta is not None,
        }
        if any(unsupported.values()):
            bad = ", ".join(f"{k}={getattr(self.args, k, None)!r}" for k, v in unsupported.items() if v)
            raise ValueError(f"TitansGRPOTrainer supports loss_type in {_SUPPORTED_LOSSES}, scale_rewards='group' "
                             f"and the defaults of the other GRPOConfig options; got {bad}")

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self._last_rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self._last_rewards

    def _generate_and_score_completions(self, inputs):
        """TRL samples and scores; the advantages are recomputed with `group_advantages`."""
        output = super()._generate_and_score_completions(inputs)
        if not self.model.training:  # evaluation may use one generation per prompt: keep TRL's
            return output
        if torch.isnan(self._last_rewards).all(1).any():
            raise ValueError("a completion got no reward (every reward function returned None)")
        rewards = (self._last_rewards * self.reward_weights.to(self._last_rewards.device)).nansum(1)
        advantages = group_advantages(rewards, self.num_generations)  # rewards of every process
        here = self.accelerator.process_index * len(inputs)
        output["advantages"] = advantages[here:here + len(inputs)].to(output["advantages"])
        return output

    def _compute_loss(self, model: nn.Module, inputs: dict[str, Any]) -> Tensor:
        completion_ids, mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], 1)
        attention_mask = torch.cat([inputs["prompt_mask"], mask], 1)
        # the logit at position Lp - 1 + t predicts o_t: keep the last T + 1, drop the final one
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                       logits_to_keep=completion_ids.shape[1] + 1).logits[:, :-1]
        logp = token_log_probs(logits, completion_ids, self.temperature)
        old_logp = inputs.get("old_per_token_logps")
        old_logp = logp.detach() if old_logp is None else old_logp  # one step per batch: rho = 1

        token_loss, is_clipped = clipped_surrogate(logp, old_logp, inputs["advantages"], self.epsilon_low,
                                                   self.epsilon_high)
        mode = "train" if self.model.training else "eval"
        if self.beta != 0.0:
            kl = k3_kl(logp, inputs["ref_per_token_logps"])
            if self.args.use_bias_correction_kl:  # DeepSeek-V3.2: rho * k3 is unbiased for the reverse KL
                kl = kl * torch.exp(logp - old_logp)
            token_loss = token_loss + self.beta * kl
            self._metrics[mode]["kl"].append(masked_mean(kl, mask).item())
        self._metrics[mode]["clip_ratio/region_mean"].append(masked_mean(is_clipped.to(logp.dtype), mask).item())

        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        if self.loss_type in ("grpo", "dr_grpo"):
            return aggregate(token_loss, mask, self.loss_type, self.max_completion_length) / accumulation
        if self.loss_type == "bnpo":  # TRL's bnpo: a token mean over this micro-batch
            return aggregate(token_loss, mask, "dapo") / accumulation
        # dapo: a token mean over the whole generation batch, which TRL splits into
        # steps_per_generation micro-batches; rescale our micro-batch mean to that normaliser
        normaliser = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normaliser = normaliser * accumulation / self.args.steps_per_generation
        return (token_loss * mask.to(token_loss.dtype)).sum() / normaliser

"""CUDA against CPU: the same numbers within float32 tolerance, and bf16 autocast.

Every test here is marked `gpu` and skipped (with the reason) where CUDA is absent; run
them with `make gpu-check` on a GPU machine.
"""

import pytest
import torch

from titans_mini import NeuralMemory, TitansConfig, TitansLM
from titans_mini.grpo import completion_log_probs, group_advantages, k3_kl

pytestmark = pytest.mark.gpu
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}  # TF32 is off by default for matmuls in torch


@pytest.mark.parametrize("sequential", [True, False])
def test_memory_on_cuda_equals_cpu(sequential):
    torch.manual_seed(0)
    memory = NeuralMemory(32, depth=2, chunk_size=8)
    x = torch.randn(2, 37, 32)
    y_cpu, state_cpu = memory(x)
    y_gpu, state_gpu = memory.cuda()(x.cuda())
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, **TOLERANCE)
    for a, b in zip(state_gpu.weights, state_cpu.weights):
        torch.testing.assert_close(a.cpu(), b, **TOLERANCE)


def test_memory_gradients_on_cuda_equal_cpu():
    torch.manual_seed(1)
    memory = NeuralMemory(16, depth=2, chunk_size=4)
    x = torch.randn(2, 19, 16)
    grads_cpu = torch.autograd.grad(memory(x)[0].square().mean(), list(memory.parameters()))
    memory = memory.cuda()
    grads_gpu = torch.autograd.grad(memory(x.cuda())[0].square().mean(), list(memory.parameters()))
    for a, b in zip(grads_gpu, grads_cpu):
        torch.testing.assert_close(a.cpu(), b, **TOLERANCE)


@pytest.mark.parametrize("variant", ["mac", "mag", "mal", "lmm", "swa"])
def test_models_on_cuda_equal_cpu_and_stream_the_same(variant):
    torch.manual_seed(2)
    model = TitansLM(TitansConfig(variant=variant, dim=32, n_layers=2, heads=2, window=8, chunk_size=4))
    ids = torch.randint(0, 149, (2, 29))
    logits_cpu, _ = model(ids)
    model = model.cuda()
    logits_gpu, _ = model(ids.cuda())
    torch.testing.assert_close(logits_gpu.cpu(), logits_cpu, **TOLERANCE)
    new_gpu, _ = model.generate(ids.cuda(), 6)
    new_cpu, _ = model.cpu().generate(ids, 6)
    assert torch.equal(new_gpu.cpu(), new_cpu)


def test_bf16_autocast_on_cuda_keeps_the_inner_loop_in_float32_and_is_finite():
    torch.manual_seed(3)
    model = TitansLM(TitansConfig(variant="mac", dim=32, n_layers=2, heads=2, window=8, chunk_size=4)).cuda()
    ids = torch.randint(0, 149, (2, 24), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, state = model(ids)
        loss = logits.float().logsumexp(-1).mean()
    loss.backward()
    memory_state = state.blocks[0].mixers[0].memory
    assert all(w.dtype == torch.float32 for w in memory_state.weights + memory_state.momentum)
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_grpo_pieces_on_cuda_equal_cpu():
    torch.manual_seed(4)
    model = TitansLM(TitansConfig(variant="mag", dim=32, n_layers=1, heads=2, window=8, chunk_size=4))
    prompts, completions = torch.randint(0, 149, (4, 10)), torch.randint(0, 149, (4, 3))
    logp_cpu = completion_log_probs(model, prompts, completions)
    logp_gpu = completion_log_probs(model.cuda(), prompts.cuda(), completions.cuda())
    torch.testing.assert_close(logp_gpu.cpu(), logp_cpu, **TOLERANCE)
    rewards = torch.rand(8)
    torch.testing.assert_close(group_advantages(rewards.cuda(), 4).cpu(), group_advantages(rewards, 4))
    torch.testing.assert_close(k3_kl(logp_gpu, logp_gpu * 1.1).cpu(), k3_kl(logp_cpu, logp_cpu * 1.1), **TOLERANCE)

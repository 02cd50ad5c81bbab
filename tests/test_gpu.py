"""The GPU group (`pytest -m gpu`, run whenever a GPU machine is lent; every test skips without CUDA): bf16 autocast
training, SDPA's flash path, the KV-cache sampler and a PPO rollout on CUDA, and the pretrain stage on an NCCL
worker group with one process per device."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gptline.model.generate import SamplingConfig, generate
from gptline.model.gpt import GPT, ModelConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the gpu group)"),
]


def small_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=256)
    return GPT(cfg).cuda()


def test_bf16_autocast_trains_like_fp32():
    model = small_model()
    tokens = torch.randint(0, 512, (8, 256), device="cuda")
    fp32_loss = model(tokens, tokens)[1]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16_loss = model(tokens, tokens)[1]
    bf16_loss.backward()
    assert float(bf16_loss) == pytest.approx(float(fp32_loss), rel=2e-2)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_training_attention_takes_sdpa_flash_path():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = small_model().to(torch.bfloat16)
    tokens = torch.randint(0, 512, (4, 256), device="cuda")
    with torch.no_grad():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if the causal training path could not use it
            flash = model(tokens)[0].float()
        with sdpa_kernel(SDPBackend.MATH):
            math_path = model(tokens)[0].float()
    torch.testing.assert_close(flash, math_path, atol=5e-2, rtol=5e-2)


def test_kv_cache_sampler_on_cuda_matches_recomputing_every_step():
    model = small_model().eval()
    prompts = [[5, 6, 7, 8, 9], [11, 12], [13, 14, 15]]
    greedy = SamplingConfig(max_new_tokens=20, temperature=0.0)
    cached = generate(model, prompts, greedy, stop_ids=[], pad_id=0)
    for prompt, answer in zip(prompts, cached, strict=True):
        sequence = list(prompt)
        with torch.no_grad():
            for _ in range(len(answer)):
                logits = model(torch.tensor([sequence], device="cuda"))[0]
                sequence.append(int(logits[0, -1].argmax()))
        assert sequence[len(prompt) :] == answer
    seeded = SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=40)
    first = generate(model, prompts, seeded, stop_ids=[], pad_id=0, generator=torch.Generator().manual_seed(3))
    again = generate(model, prompts, seeded, stop_ids=[], pad_id=0, generator=torch.Generator().manual_seed(3))
    assert first == again


def test_pretrain_on_an_nccl_group_of_one_process_per_device(tmp_path, ray_session):
    from pipeline.config import typed
    from pipeline.dag import StageContext, StageResources
    from stages import pretrain
    from tests.test_pretrain import SMALL, build_inputs

    devices = torch.cuda.device_count()
    cfg = typed(pretrain.PretrainConfig, {**SMALL, "batch_size": 8 * devices})
    resources = StageResources(num_workers=devices, cpus_per_worker=1.0, gpus_per_worker=1.0)
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext("pretrain", resources=resources, quiet=True)
    final = pretrain.run(cfg, build_inputs(tmp_path / "inputs"), out, ctx)
    assert final["steps"] == SMALL["steps"] and final["zero_stage"] == (0 if devices == 1 else 2)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]


def test_the_ppo_stage_runs_on_one_gpu(tmp_path, ray_session):
    """The whole ppo stage (KV-cache rollout, scoring, GAE, updates of two DeepSpeed engines in bf16) on a worker
    holding one GPU, the frozen reference and reward model beside it."""
    from tests.test_ppo import build_models, run_ppo

    final = run_ppo(build_models(tmp_path / "inputs"), tmp_path / "out", workers=1, gpus=1.0, iterations=2)
    assert final["steps"] == 2 and math.isfinite(final["reward_mean"]) and math.isfinite(final["policy_loss"])

"""`gptline plan` against published figures: LLaMA-65B's training time, GPT-3's training FLOPs, and the ZeRO paper's
per-GPU model-state memory."""

from __future__ import annotations

import pytest

from gptline.cli import plan
from gptline.cli.main import main
from pipeline.errors import ConfigError


def test_llama_65b_on_1_4t_tokens_at_380_tokens_per_gpu_second_on_2048_gpus_takes_about_21_days():
    cfg = plan.load_preset("llama-65b", 32000)
    result = plan.plan(None, cfg, 1.4e12, "a100-80gb", 2048, None, 1, True, 380, 0.4)
    assert result.params / 1e9 == pytest.approx(65.2, abs=0.1)
    assert result.days == pytest.approx(21, abs=0.5)  # Touvron et al. 2023, section 2.4


def test_gpt3_175b_on_300b_tokens_is_3_14e23_flops():
    cfg = plan.load_preset("gpt3-175b", 50257)
    result = plan.plan(None, cfg, 300e9, "v100", 1024, None, 1, True, None, 0.4)
    assert result.params / 1e9 == pytest.approx(175, abs=1)
    assert result.flops_6nd == pytest.approx(3.14e23, rel=0.01)  # Brown et al. 2020, table D.1
    assert result.flops_with_attention > result.flops_6nd


def test_zero_paper_7_5b_model_on_64_gpus():
    # Rajbhandari et al. 2020, figure 1: 120, 31.4, 16.6 and 1.9 GB per GPU.
    result = plan.plan(7.5e9, None, 1e9, "v100", 64, None, 1, True, None, 0.4)
    assert [round(result.model_states_gb[s], 1) for s in range(4)] == [120.0, 31.4, 16.6, 1.9]
    assert result.activations_gb is None and result.flops_with_attention is None


def test_activation_checkpointing_keeps_only_layer_inputs():
    cfg = plan.load_preset("llama-7b", 32000)
    full = plan.activation_bytes(cfg, 1, 2048, checkpointing=False)
    checkpointed = plan.activation_bytes(cfg, 1, 2048, checkpointing=True)
    per_layer = 2048 * 4096 * (34 + 5 * 32 * 2048 / 4096)
    assert full == pytest.approx(32 * per_layer) and checkpointed < full / 10


def test_the_command_prints_the_plan_and_names_bad_arguments(capsys):
    argv = ["plan", "--model", "llama-65b", "--tokens", "1.4e12", "--gpus", "2048", "--tokens-per-gpu-s", "380"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "65.29e9 parameters" in out and "20.8 days on 2048 GPUs" in out and "ZeRO-3" in out
    assert main(["plan", "--model", "llama-1t", "--tokens", "1e9", "--gpus", "8"]) == 2
    assert "no such preset" in capsys.readouterr().err
    assert main(["plan", "--params", "1e9", "--tokens", "-1", "--gpus", "8"]) == 2
    assert "--tokens must be > 0" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--gpu 'tpu'"):
        plan.plan(1e9, None, 1e9, "tpu", 8, None, 1, True, None, 0.4)

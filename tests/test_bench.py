"""The benchmark scripts still run (slow group): each at its smallest setting, as a subprocess (they start their
own Ray), printing the ratios it exists for. The figures are not checked here; bench/ is where they are measured."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.test_tokenizer import SHAKESPEARE


def bench(module: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray, not this session's
    done = subprocess.run([sys.executable, "-m", f"bench.{module}", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_data_benches_run_on_the_default_corpus(default_data):
    store = str(default_data)  # the benches read the fetch, crawl_mix and tokenizer artifacts there
    out = bench("tokenize", "--store", store, "--copies", "1", "--repeats", "1")
    assert "stage (2 workers) / sentencepiece loop:" in out and "HF tokenizers / sentencepiece loop:" in out
    assert "word-aligned pieces / whole documents" in out
    out = bench("crawl_mix", "--store", store, "--repeats", "1", "--warmup", "0")
    assert "docs/s" in out


@pytest.mark.slow
def test_model_benches_run_at_a_tiny_shape(tmp_path):
    out = bench("pretrain", "--dim", "64", "--layers", "1", "--heads", "2", "--vocab", "256", "--seq", "32",
                "--batch", "2", "--steps", "2")  # fmt: skip
    assert "ratio ours (compiled) / transformers (eager):" in out and "MFU (ours (compiled))" in out
    if not SHAKESPEARE.exists():
        pytest.skip(f"bench.ppo trains its tokenizer on {SHAKESPEARE}")
    out = bench("ppo", "--dim", "64", "--layers", "1", "--heads", "2", "--vocab", "512", "--prompt", "8", "--batch",
                "4", "--minibatch", "2", "--new-tokens", "8", "--repeats", "1", "--iterations", "1", "--trl-python",
                str(tmp_path / "no-trl"))  # fmt: skip
    assert "with the KV cache" in out and "one PPO iteration, ours:" in out
    out = bench("grpo", "--dim", "64", "--layers", "1", "--heads", "2", "--vocab", "512", "--prompt", "8", "--batch",
                "2", "--group", "4", "--minibatch", "4", "--new-tokens", "8", "--iterations", "1", "--trl-python",
                str(tmp_path / "no-trl"))  # fmt: skip
    assert "machine: " in out and "one GRPO iteration, ours:" in out

"""`gptline chat` and `gptline sample` as a user runs them: driven through a pipe, answering every turn, exiting
cleanly on EOF, reproducible with a fixed seed, resolving a stage name to its newest artifact in the store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptline.model.export import export
from gptline.model.gpt import GPT, ModelConfig
from tests.test_tokenizer import shakespeare_docs, train_tokenizer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("chat-cli")
    tok = train_tokenizer(tmp, shakespeare_docs()[:600], vocab_size=400)
    meta = json.loads((tok / "tokenizer_meta.json").read_text())
    torch.manual_seed(0)
    model = GPT(ModelConfig(dim=32, n_layers=2, n_heads=4, max_seq_len=64, multiple_of=16,
                            vocab_size=meta["vocab_size"]))  # fmt: skip
    export(model, tmp / "model", tok, meta["special_ids"])
    return tmp / "model"


def gptline(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptline", *args], input=stdin, capture_output=True, text=True,
                          cwd=ROOT, timeout=120)  # fmt: skip


def test_chat_through_a_pipe_answers_each_turn_and_is_reproducible(model_dir):
    turns = "Good morrow.\n\nWhat news?\n" + "a long turn " * 40 + "\nAnd then?\n"
    first = gptline("chat", str(model_dir), "--seed", "3", "--max-new-tokens", "12", stdin=turns)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    # Four non-empty user turns: three answers, and a notice for the one longer than the whole context (the
    # conversation starts afresh after it).
    assert len([line for line in lines if line.startswith("model> ")]) == 3
    assert "longer than the model's context" in first.stdout
    again = gptline("chat", str(model_dir), "--seed", "3", "--max-new-tokens", "12", stdin=turns)
    assert again.stdout == first.stdout
    other = gptline("chat", str(model_dir), "--seed", "4", "--max-new-tokens", "12", stdin=turns)
    assert other.stdout != first.stdout


def test_sample_continues_a_prompt_and_bad_flags_are_clear(model_dir):
    out = gptline("sample", str(model_dir), "To be, or not", "--max-new-tokens", "8", "--temperature", "0")
    assert out.returncode == 0 and out.stdout.startswith("To be, or not") and len(out.stdout) > len("To be, or not\n")
    bad = gptline("sample", str(model_dir), "x", "--top-p", "0")
    assert bad.returncode == 2 and "--top-p must be in (0, 1]" in bad.stderr
    missing = gptline("chat", "nothing_here", "--store", str(model_dir.parent / "no-store"))
    assert missing.returncode == 2 and "neither a model directory nor a stage" in missing.stderr


def test_history_keeps_the_system_message_and_the_newest_turns_that_fit(model_dir):
    from gptline.cli.chat import fit_history
    from gptline.data.chat import ChatTemplate

    template = ChatTemplate(model_dir)
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        messages += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    messages.append({"role": "user", "content": "last question"})
    room = len(template.prompt([messages[0], *messages[-5:]]))
    kept = fit_history(template, messages, room)
    assert kept == [messages[0], *messages[-5:]]
    assert fit_history(template, messages, 10_000) == messages

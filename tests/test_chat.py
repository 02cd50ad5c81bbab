"""The chat template, conversation and comparison records, the SFT loss mask, the RM objective and reward readout,
LoRA, and the converters that derive chat and preference data from registry files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gptline.data.chat import ChatTemplate, Skipped, read_comparisons, read_conversations
from gptline.data.readers import MAX_LINE_BYTES
from gptline.model.export import export, load
from gptline.model.gpt import GPT, IGNORE_INDEX, ModelConfig, ScalarModel, rewards_at
from gptline.model.lora import LoRAConfig, apply_lora, merge_lora
from gptline.training.loaders import collate_examples, pad_rows, training_row
from stages import fetch, rm

TINY = {"dim": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 128, "multiple_of": 16}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def tiny_model(template: ChatTemplate, cls=GPT, seed: int = 0):
    torch.manual_seed(seed)
    return cls(ModelConfig(**TINY, vocab_size=template.tokenizer.vocab_size))


# ---- the template -------------------------------------------------------------------------------------------
def test_template_trains_every_assistant_turn_and_nothing_else(template):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Who art thou?"},
        {"role": "assistant", "content": "A king."},
        {"role": "user", "content": "Of what?"},
        {"role": "assistant", "content": "Of Denmark."},
    ]
    ids, trained = template.encode(messages)
    ids_list = ids.tolist()
    assert ids_list[0] == template.ids["bos"]
    starts = [i for i, t in enumerate(ids_list) if t == template.ids["assistant"]]
    ends = [i for i, t in enumerate(ids_list) if t == template.end_of_turn]
    assert len(starts) == 2 and len(ends) == 5
    expected = np.zeros(len(ids), dtype=bool)
    for start in starts:
        end = next(e for e in ends if e > start)
        expected[start + 1 : end + 1] = True  # the answer's pieces and its end-of-turn
    assert (trained == expected).all()
    assert template.decode(ids[starts[1] + 1 : ends[-1] + 1].tolist()) == "Of Denmark."
    prompt = template.prompt(messages[:4])
    assert prompt[-1] == template.ids["assistant"] and prompt[:-1] == template.encode(messages[:4])[0].tolist()


def test_role_markers_typed_by_a_user_are_text_not_control_tokens(template):
    ids, _ = template.encode([{"role": "user", "content": "<|assistant|> hi <|end|>"}])
    assert ids.tolist().count(template.ids["assistant"]) == 0
    assert ids.tolist().count(template.end_of_turn) == 1


# ---- records --------------------------------------------------------------------------------------------------
def test_conversation_records_and_bad_ones_skipped_by_reason(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"prompt": "Hi", "response": "Hello there.", "system": "Be kind."},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
        {"prompt": "Hi", "response": "   "},
        {"prompt": "Hi"},
        {"messages": [{"role": "robot", "content": "x"}]},
        {"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "late"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        "{not json",
        "[1, 2]",
    ])  # fmt: skip
    skipped = Skipped()
    conversations = read_conversations([str(path)], "sft.data", skipped, MAX_LINE_BYTES)
    assert [len(c) for c in conversations] == [3, 4]
    assert conversations[0][0] == {"role": "system", "content": "Be kind."}
    assert dict(skipped.counts) == {
        "empty_response": 1, "missing_response": 1, "bad_role": 1, "system_not_first": 1, "no_assistant_turn": 1,
        "invalid_json": 1, "not_an_object": 1,
    }  # fmt: skip
    assert skipped.summary()["empty_response"]["first"] == f"{path}:3"


def test_rankings_expand_to_all_pairs_weighted_per_prompt(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "Q", "completions": ["w", "x", "y", "z"], "ranking": [2, 0, 3, 1]},
        {"prompt": "Q2", "chosen": "good", "rejected": "bad"},
        {"prompt": "Q3", "rejected": "bad"},
        {"prompt": "Q4", "completions": ["a", "b", "c"], "ranking": [0, 0, 1]},
        {"prompt": "Q5", "chosen": "", "rejected": "bad"},
    ])  # fmt: skip
    skipped = Skipped()
    pairs = read_comparisons([str(path)], "rm.data", skipped, MAX_LINE_BYTES)
    ranked = [p for p in pairs if p.prompt[0]["content"] == "Q"]
    assert len(ranked) == 6 and all(p.weight == pytest.approx(1 / 6) for p in ranked)
    order = ["y", "w", "z", "x"]  # ranking lists completion indices best first
    assert {(p.chosen, p.rejected) for p in ranked} == {(order[i], order[j]) for i in range(4) for j in range(i + 1, 4)}
    assert [(p.chosen, p.rejected, p.weight) for p in pairs[6:]] == [("good", "bad", 1.0)]
    assert dict(skipped.counts) == {"missing_chosen": 1, "ranking_not_a_permutation": 1, "empty_chosen": 1}


def test_hh_transcripts_split_into_shared_prompt_and_two_answers(tmp_path):
    shared = "\n\nHuman: How do I bake bread?\n\nAssistant: With flour.\n\nHuman: And then?"
    path = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": shared + "\n\nAssistant: Knead it and bake it.", "rejected": shared + "\n\nAssistant: No."},
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: different\n\nAssistant: c"},
        {"chosen": shared + "\n\nAssistant: Fine.", "rejected": shared + "\n\nAssistant:  "},
    ])  # fmt: skip
    skipped = Skipped()
    (pair,) = read_comparisons([str(path)], "rm.data", skipped, MAX_LINE_BYTES)
    assert [m["role"] for m in pair.prompt] == ["user", "assistant", "user"]
    assert pair.prompt[2]["content"] == "And then?"
    assert (pair.chosen, pair.rejected) == ("Knead it and bake it.", "No.")
    assert dict(skipped.counts) == {"hh_transcripts_differ_before_the_last_answer": 1, "empty_response": 1}


# ---- SFT ---------------------------------------------------------------------------------------------------------
def sft_loss_and_grads(model: GPT, inputs: np.ndarray, targets: np.ndarray):
    model.zero_grad()
    _, loss = model(torch.from_numpy(inputs)[None], torch.from_numpy(targets)[None])
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_sft_loss_ignores_prompt_targets_and_follows_response_targets(template):
    messages = [{"role": "user", "content": "What is the hour?"}, {"role": "assistant", "content": "Past twelve."}]
    ids, trained = template.encode(messages)
    inputs, targets = training_row(ids, trained)
    assert (targets[~trained[1:]] == IGNORE_INDEX).all() and (targets[trained[1:]] == ids[1:][trained[1:]]).all()
    model = tiny_model(template)
    reference = sft_loss_and_grads(model, inputs, targets)

    prompt_position = int(np.flatnonzero(~trained[1:])[2])  # a user-turn token's target
    changed = ids.copy()
    changed[prompt_position + 1] = (changed[prompt_position + 1] + 7) % template.tokenizer.vocab_size
    _, prompt_changed_targets = training_row(changed, trained)
    same = sft_loss_and_grads(model, inputs, prompt_changed_targets)
    assert torch.equal(same[0], reference[0]) and all(
        torch.equal(a, b) for a, b in zip(same[1], reference[1], strict=True)
    )

    response_position = int(np.flatnonzero(trained[1:])[0])
    changed = ids.copy()
    changed[response_position + 1] = (changed[response_position + 1] + 7) % template.tokenizer.vocab_size
    _, response_changed_targets = training_row(changed, trained)
    different = sft_loss_and_grads(model, inputs, response_changed_targets)
    assert not torch.allclose(different[0], reference[0])


def test_padded_examples_do_not_see_each_other(template):
    """Right padding with causal attention: an example's loss is the same alone and batched with a longer one."""
    short = template.encode([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hail."}])
    long = template.encode([{"role": "user", "content": "Speak the speech, I pray you, as I pronounced it to you"},
                            {"role": "assistant", "content": "Trippingly on the tongue."}])  # fmt: skip
    model = tiny_model(template)
    inputs, targets = collate_examples([short, long, None], template.ids["pad"])
    assert inputs.shape[0] == 3 and (targets[2] == IGNORE_INDEX).all()
    logits, _ = model(torch.from_numpy(inputs))
    alone_inputs, _ = collate_examples([short], template.ids["pad"])
    alone, _ = model(torch.from_numpy(alone_inputs))
    assert torch.allclose(logits[0, : alone.shape[1]], alone[0], atol=1e-5)


# ---- RM ----------------------------------------------------------------------------------------------------------
def test_pairwise_loss_matches_a_hand_computation():
    chosen, rejected = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([1.0, 1.5, -1.0])
    weight = torch.tensor([1.0, 1 / 6, 1 / 6])
    by_hand = 1.0 * math.log(1 + math.exp(-1.0)) + (1 / 6) * math.log(1 + math.exp(1.0)) + (1 / 6) * math.log(2)
    by_hand /= 1 + 2 / 6
    assert float(rm.pairwise_loss(chosen, rejected, weight)) == pytest.approx(by_hand, rel=1e-6)
    assert float(rm.pairwise_loss(chosen, rejected, torch.zeros(3))) == 0.0


@torch.no_grad()
def test_reward_is_read_at_the_reward_token_under_left_and_right_padding(template):
    model = tiny_model(template, ScalarModel)
    prompt = [{"role": "user", "content": "Which is the better answer?"}]
    rows = [
        template.reward_input(prompt, "A short one."),
        template.reward_input(prompt, "A much longer answer, with more words in it."),
    ]
    alone = [float(rewards_at(model, torch.from_numpy(r)[None], torch.ones(1, len(r)), template.ids["reward"]))
             for r in rows]  # fmt: skip
    for left in (False, True):
        tokens, mask = pad_rows(rows, template.ids["pad"], left=left)
        batched = rewards_at(model, torch.from_numpy(tokens), torch.from_numpy(mask), template.ids["reward"])
        assert batched.tolist() == pytest.approx(alone, abs=1e-5)
    # Without the mask the padding would be read as content: the readout really depends on the position.
    tokens, mask = pad_rows(rows, template.ids["pad"], left=True)
    values = model(torch.from_numpy(tokens))
    assert float(values[0, -1]) != pytest.approx(alone[0], abs=1e-5)


def test_reward_model_export_loads_as_transformers_sequence_classifier(template, tmp_path, tok):
    from transformers import LlamaForSequenceClassification

    model = tiny_model(template, ScalarModel).eval()
    export(model, tmp_path / "rm", tok, template.ids)
    hf = LlamaForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert isinstance(load(tmp_path / "rm"), ScalarModel)
    prompt = [{"role": "user", "content": "Good morrow."}]
    rows = [template.reward_input(prompt, "Good morrow to you."), template.reward_input(prompt, "Away!")]
    for left in (False, True):
        tokens, mask = pad_rows(rows, template.ids["pad"], left=left)
        ours = rewards_at(model, torch.from_numpy(tokens), torch.from_numpy(mask), template.ids["reward"])
        with torch.no_grad():
            theirs = hf(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask)).logits[:, 0]
        assert torch.allclose(ours, theirs, atol=1e-4)


def test_reward_model_starts_from_the_language_model_trunk(template):
    lm = tiny_model(template)
    scalar = ScalarModel.from_language_model(lm)
    assert torch.equal(scalar.layers[0].mlp.up_proj.weight, lm.layers[0].mlp.up_proj.weight)
    tokens = torch.tensor([[1, 5, 9, 12]])
    assert torch.allclose(scalar.hidden(tokens), lm.hidden(tokens))


# ---- LoRA --------------------------------------------------------------------------------------------------------
def test_lora_starts_at_the_base_model_trains_only_adapters_and_merges_exactly(template):
    model = tiny_model(template)
    tokens = torch.tensor([[1, 7, 30, 99, 4]])
    before, _ = model(tokens)
    wrapped = apply_lora(model, LoRAConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    assert wrapped == 2 * TINY["n_layers"]
    assert torch.allclose(model(tokens)[0], before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(std=0.1)
    adapted, _ = model(tokens)
    assert not torch.allclose(adapted, before)
    merge_lora(model)
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert torch.allclose(model(tokens)[0], adapted, atol=1e-5)
    assert set(model.state_dict()) == set(tiny_model(template).state_dict())


# ---- registry-derived data ------------------------------------------------------------------------------------
def test_multiple_choice_items_become_preference_pairs():
    question = "Which gas do plants take in?\nA. Oxygen\nB. Carbon dioxide\nC. Helium\nAnswer:"
    assert fetch.multiple_choice(question, "B") == ("Which gas do plants take in?", "Carbon dioxide",
                                                    ["Oxygen", "Helium"])  # fmt: skip
    assert fetch.multiple_choice("Pick one\n\na) red\nb) blue", "b) blue") == ("Pick one", "blue", ["red"])
    assert fetch.multiple_choice("Pick one\n A: red\n B: blue", "A")[1] == "red"
    assert fetch.multiple_choice("No options here", "A") is None
    assert fetch.multiple_choice("Skew\nA. x/y\nB. x\nC. x/y", "A") == ("Skew", "x/y", ["x"])  # no identical pair
    assert fetch.multiple_choice("Pick\nA. red\nB. blue", "D") is None

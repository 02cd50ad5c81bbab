"""evaluate's parts: judgments, win rates and Elo; few-shot scoring; the prompt readback; the identical-model control."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gptline.data import fewshot
from gptline.model.gpt import GPT, ScalarModel
from stages import evaluate
from tests.test_chat import tiny_model


def test_outcomes_and_win_rate_count_ties_as_half():
    a, b = np.array([1.0, 0.0, 2.0, 3.0]), np.array([0.5, 1.0, 2.0, 1.0])
    results = evaluate.outcomes(a, b)
    assert results.tolist() == [1.0, 0.0, 0.5, 1.0]
    rate, stderr = evaluate.win_rate(results)
    assert rate == pytest.approx(0.625)
    assert stderr == pytest.approx(np.std(results, ddof=1) / 2)


def test_elo_orders_players_by_strength_and_stays_finite_for_an_unbeaten_one():
    rng = np.random.default_rng(0)
    strength = {"weak": 0.0, "mid": 200.0, "strong": 400.0}  # Elo points
    games = []
    for a, b in [("weak", "mid"), ("mid", "strong"), ("weak", "strong")]:
        p = 1 / (1 + 10 ** ((strength[b] - strength[a]) / 400))
        games += [(a, b, float(rng.random() < p)) for _ in range(2000)]
    ratings = evaluate.elo(games)
    assert ratings["weak"] < ratings["mid"] < ratings["strong"]
    assert ratings["strong"] - ratings["weak"] == pytest.approx(400, abs=40)
    assert np.mean(list(ratings.values())) == pytest.approx(1000)
    unbeaten = evaluate.elo([("a", "b", 1.0)] * 10)
    assert math.isfinite(unbeaten["a"]) and unbeaten["a"] > unbeaten["b"]
    even = evaluate.elo([("a", "b", 1.0), ("a", "b", 0.0)] * 5)
    assert even["a"] == pytest.approx(even["b"])


def test_fewshot_items_hold_their_answer_among_distinct_choices():
    for task in fewshot.TASKS.values():
        for i, item in enumerate(task):
            assert item.answer in item.choices and len(set(item.choices)) == fewshot.CHOICES
            shown = fewshot.prompt(task, i, 3)
            assert shown.endswith(item.context) and shown.count("\n") == 3
            assert f"{item.context}{item.answer}." not in shown  # the item itself is never an example
    positions = [item.choices.index(item.answer) for item in fewshot.TASKS["capitals"]]
    assert len(set(positions)) == fewshot.CHOICES  # the answer is not always in the same slot


def test_sequence_logprobs_equal_a_full_forward_under_padding(template):
    model = tiny_model(template).eval()
    sp = template.tokenizer
    pairs = [evaluate.continuation(sp, "The capital of France is", " Paris"),
             evaluate.continuation(sp, "To be, or not", " to be, that is the question")]  # fmt: skip
    got = evaluate.sequence_logprobs(model, [c for c, _ in pairs], [x for _, x in pairs], template.ids["pad"], 2)
    for (context, answer), score in zip(pairs, got, strict=True):
        assert sp.decode(context + answer) in ("The capital of France is Paris",
                                               "To be, or not to be, that is the question")  # fmt: skip
        tokens = torch.tensor([context + answer])
        with torch.no_grad():
            logp = torch.log_softmax(model(tokens)[0][0, :-1], -1)
        expected = sum(float(logp[len(context) - 1 + k, t]) for k, t in enumerate(answer))
        assert score == pytest.approx(expected, abs=1e-4)


def test_prompts_read_back_from_reward_inputs(template):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"}]
    ids = template.reward_input(prompt, "A king.")
    cut = int(np.flatnonzero(ids == template.ids["assistant"])[-1])
    assert template.messages(ids[:cut].tolist()) == prompt
    assert template.prompt(template.messages(ids[:cut].tolist())) == ids[: cut + 1].tolist()


def test_an_identical_model_wins_half_the_time_within_noise(template, tmp_path):
    """The control the stage reports: the same model with two seeds, judged by a reward model."""
    policy = tiny_model(template, GPT, seed=1).eval()
    judge = evaluate.Judge(tiny_model(template, ScalarModel, seed=2).eval(), template, 32)
    questions = ["Who art thou?", "What is the hour?", "Where is the king?", "How fares the day?"]
    prompts = [[{"role": "user", "content": f"{q} ({i})"}] for i in range(24) for q in questions]
    encoded = [template.prompt(p) for p in prompts]
    cfg = evaluate.EvaluateConfig(batch_size=32)
    cfg.sampling.max_new_tokens = 12
    rewards = []
    for seed in (0, 1):
        answers, _, _ = evaluate.sample_answers(policy, encoded, cfg, [template.end_of_turn], template.ids["pad"], seed)
        rewards.append(judge.rewards(prompts, [template.decode(a) for a in answers]))
    rate, stderr = evaluate.win_rate(evaluate.outcomes(*rewards))
    assert abs(rate - 0.5) < 3 * stderr, (rate, stderr)
    assert not np.array_equal(*rewards)  # two seeds really gave different answers


def test_entropy_of_a_distribution():
    uniform = torch.zeros(3, 8)
    assert evaluate.distribution_entropy(uniform).tolist() == pytest.approx([math.log(8)] * 3)
    peaked = torch.tensor([[100.0, 0, 0, 0]])
    assert float(evaluate.distribution_entropy(peaked)[0]) == pytest.approx(0, abs=1e-6)


def test_bad_config_names_the_key():
    cfg = evaluate.EvaluateConfig(best_of=0)
    assert [k for k, _ in cfg.validate()] == ["best_of"]
    cfg = evaluate.EvaluateConfig()
    cfg.sampling.top_p = 2.0
    assert [k for k, _ in cfg.validate()] == ["sampling.top_p"]


def test_evaluate_compares_every_aligned_model_present(template, tok, tmp_path):
    """The stage end to end on tiny random models: with dpo alone, and with ppo and dpo, each aligned model is judged
    against sft, base and the others, rated, and measured (perplexity, entropy, answer length, held-out accuracy on
    the verifiable sets present)."""
    import pyarrow as pa

    from gptline.data.formats import COMPARISONS, EXAMPLES, save_ragged, write_ipc
    from gptline.model.export import export
    from pipeline.dag import StageContext

    def model_dir(name: str, cls=GPT, seed: int = 0) -> Path:
        export(tiny_model(template, cls, seed), tmp_path / name, tok, template.ids)
        return tmp_path / name

    questions = ["Who art thou?", "What is the hour?", "Where is the king?", "Why weep you?"]
    inputs = {"pretrain": model_dir("base"), "sft": model_dir("sft", seed=1), "rm": model_dir("rm", ScalarModel),
              "tokenize": tmp_path / "tokenize", "ppo": model_dir("ppo", seed=2), "dpo": model_dir("dpo", seed=3)}  # fmt: skip
    encoded = [template.encode([{"role": "user", "content": q}, {"role": "assistant", "content": "A man."}])
               for q in questions]  # fmt: skip
    save_ragged(inputs["sft"] / EXAMPLES, {"validation_ids": [i for i, _ in encoded],
                                           "validation_trained": [t.astype(np.int64) for _, t in encoded]})  # fmt: skip
    pairs = [(template.reward_input([{"role": "user", "content": q}], "Yes."),
              template.reward_input([{"role": "user", "content": q}], "No.")) for q in questions]  # fmt: skip
    save_ragged(inputs["rm"] / COMPARISONS, {"validation_chosen": [c for c, _ in pairs],
                                             "validation_rejected": [r for _, r in pairs]})  # fmt: skip
    tokens = np.array(template.tokenizer.encode(" ".join(questions * 20)), dtype=np.uint16)
    write_ipc(pa.table({"tokens": tokens}), inputs["tokenize"] / "validation" / "part-0.tokens.arrow")
    inputs["fetch"] = tmp_path / "fetch"  # the arithmetic set only: the evals math set is left out, with its key
    (inputs["fetch"] / "arithmetic").mkdir(parents=True)
    tasks = [{"prompt": f"What is {a} + {a}?", "answer": str(2 * a)} for a in range(5)]
    (inputs["fetch"] / "arithmetic" / "held_out.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tasks))
    cfg = evaluate.EvaluateConfig(num_prompts=4, best_of=2, shots=1, perplexity_tokens=256,
                                  sampling=evaluate.SamplingConfig(max_new_tokens=8))  # fmt: skip
    for aligned in (["dpo"], ["ppo", "dpo"]):
        out = tmp_path / f"evaluate-{'-'.join(aligned)}"
        out.mkdir()
        present = {k: v for k, v in inputs.items() if k in evaluate.JUDGED_BY or k in aligned}
        metrics = evaluate.run(cfg, present, out, StageContext("evaluate", quiet=True))
        result = json.loads((out / evaluate.EVALUATION).read_text())
        judged = [(m["a"], m["b"]) for m in result["matchups"]]
        assert judged == evaluate.matchups(aligned) and result["aligned"] == aligned
        assert all((a, "sft") in judged and (a, "base") in judged for a in aligned)
        assert (("ppo", "dpo") in judged) == (len(aligned) == 2)
        assert set(result["elo"]) == {"base", "sft", "best_of_n", *aligned}
        assert set(result["perplexity"]) == set(result["entropy"]) == {"base", "sft", *aligned}
        assert {"sft", "best_of_n", *aligned} <= set(result["answer_length"]) and metrics[f"length_{aligned[0]}"] > 0
        assert not any(k.startswith("win_ppo") for k in metrics) or "ppo" in aligned
        arithmetic, evals_math = result["verifiable"]["arithmetic"], result["verifiable"]["evals_math"]
        assert arithmetic["tasks"] == 5 and set(arithmetic["accuracy"]) == {"sft", *aligned}
        assert all(0 <= a <= 1 for a in arithmetic["accuracy"].values()) and "verifiable_arithmetic_sft" in metrics
        assert "evaluate.verifiable.sets.evals_math[0]: no file matches" in evals_math["left_out"]
        sections = evaluate.report(out)
        assert [s["kind"] for s in sections][:2] == ["bars", "bars"]
        titles = [s["title"] for s in sections]
        assert "verifiable sets left out" in titles and any(t.startswith("held-out accuracy on the") for t in titles)

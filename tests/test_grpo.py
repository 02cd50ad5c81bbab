"""GRPO: the critic-free pieces against hand computations, the exact-answer reward, bad input caught before training,
and the stage end to end on Ray Train: held-out accuracy on generated arithmetic rises above the sft model's with
the KL bounded (three seeds), and a run killed after a checkpoint resumes to the uninterrupted run's log and
weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gptline.data.chat import ChatTemplate
from gptline.data.verifiable import arithmetic_tasks, exact_answer, final_answer, held_out_reward
from gptline.model.export import export, load
from gptline.model.generate import SamplingConfig
from gptline.model.gpt import GPT, ModelConfig
from gptline.training import rl
from gptline.training.loaders import collate_examples
from pipeline.config import ConfigError, typed, validate
from pipeline.dag import StageContext, StageResources
from pipeline.errors import GptlineError
from stages import grpo
from tests.test_tokenizer import train_tokenizer


# ---- the algorithm -----------------------------------------------------------------------------------------
def test_group_advantages_match_a_hand_computation():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 5.0, 3.0])  # two groups of four
    g1, g2 = [1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 5.0, 3.0]
    mean1, mean2 = 0.5, 3.0
    std1 = math.sqrt(sum((x - mean1) ** 2 for x in g1) / 3)  # unbiased, as TRL's GRPOTrainer
    std2 = math.sqrt(sum((x - mean2) ** 2 for x in g2) / 3)
    expected = [(x - mean1) / (std1 + 1e-4) for x in g1] + [(x - mean2) / (std2 + 1e-4) for x in g2]
    assert rl.group_advantages(scores, 4, "grpo").tolist() == pytest.approx(expected, rel=1e-6)
    unscaled = [x - mean1 for x in g1] + [x - mean2 for x in g2]
    assert rl.group_advantages(scores, 4, "grpo", scale_by_std=False).tolist() == pytest.approx(unscaled)
    # RLOO: each answer against the mean of the other three
    rloo = [1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3, 2 - 10 / 3, 2 - 10 / 3, 5 - 7 / 3, 3 - 9 / 3]
    assert rl.group_advantages(scores, 4, "rloo").tolist() == pytest.approx(rloo)
    # REINFORCE++: normalized over the whole batch (population std)
    mean, std = 14 / 8, math.sqrt(sum((x - 14 / 8) ** 2 for x in scores.tolist()) / 8)
    expected = [(x - mean) / std for x in scores.tolist()]
    assert rl.group_advantages(scores, 4, "reinforce++").tolist() == pytest.approx(expected, rel=1e-6)


def test_k3_is_non_negative_and_unbiased_on_samples():
    generator = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(50, generator=generator) * 2, -1)
    q = torch.softmax(torch.randn(50, generator=generator) * 2, -1)
    exact = float((p * (p.log() - q.log())).sum())  # KL(p || q)
    tokens = torch.multinomial(p, 400_000, replacement=True, generator=generator)
    k3 = rl.kl_terms(p.log()[tokens], q.log()[tokens], "k3")
    assert bool((k3 >= 0).all())
    standard_error = float(k3.std()) / math.sqrt(len(tokens))
    assert abs(float(k3.mean()) - exact) < 4 * standard_error, (float(k3.mean()), exact, standard_error)


def test_aggregation_and_rewards_to_go():
    x = torch.tensor([[1.0, 3.0, 0.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert float(rl.aggregate(x, mask, "token")) == pytest.approx(8 / 3)  # every token weighs the same
    assert float(rl.aggregate(x, mask, "sequence")) == pytest.approx((2 + 4) / 2)  # every answer does
    rtg = rl.rewards_to_go(torch.tensor([[1.0, 2.0, 4.0], [3.0, 5.0, 7.0]]), mask)
    assert rtg.tolist() == [[3.0, 2.0, 0.0], [3.0, 0.0, 0.0]]


def test_token_advantages_with_the_kl_as_a_reward_penalty():
    cfg = grpo.GRPOConfig(group_size=2, advantage="rloo", kl=grpo.GRPOKLConfig(coef=0.5, mode="reward"))
    scores, mask = torch.tensor([1.0, 0.0]), torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    kl = torch.tensor([[0.2, 0.4], [0.6, 0.0]])
    advantages = grpo.token_advantages(scores, kl, mask, cfg)
    # rloo: +1 and -1; then the rewards-to-go of -0.5 * KL
    assert advantages.flatten().tolist() == pytest.approx([1 - 0.5 * 0.6, 1 - 0.5 * 0.4, -1 - 0.5 * 0.6, 0.0])
    loss_mode = grpo.token_advantages(scores, kl, mask, grpo.GRPOConfig(group_size=2, advantage="rloo"))
    assert loss_mode.tolist() == [[1.0, 1.0], [-1.0, 0.0]]


def test_sequence_aggregation_of_the_clipped_objective():
    old = torch.zeros(2, 2)
    new = torch.log(torch.tensor([[1.5, 1.0], [1.0, 1.0]]))
    advantages = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, _ = rl.policy_loss(new, old, advantages, mask, clip=0.2, aggregation="sequence")
    # answer 0: tokens -1.2 (clipped) and -1; answer 1: one token, -2
    assert float(loss) == pytest.approx(((-1.2 - 1.0) / 2 + -2.0) / 2)


def test_exact_answer_reads_the_final_answer():
    assert final_answer("3 + 4 makes 7, so [7]") == "7"
    assert final_answer("first 3, then 12") == "12"
    answers = ["the answer is [4]", "1,440", "It is 16.0476.", "7 or 8", "", "[five]"]
    references = ["4.0000", "1440", "16.0476", "7", "3", "Five"]
    assert exact_answer(answers, references) == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="expected `answer`"):
        exact_answer(["1"], [None])


def test_generated_arithmetic_splits_share_no_problem():
    train, held_out = arithmetic_tasks(200, 60, 9, "+-*", seed=3)
    assert len(train) == 200 and len(held_out) == 60
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    assert all(str(eval(r["prompt"][8:-1])) == r["answer"] for r in train + held_out)  # "What is a op b?"
    assert arithmetic_tasks(200, 60, 9, "+-*", seed=3) == (train, held_out)


# ---- the stage ----------------------------------------------------------------------------------------------
MAX_OPERAND, OPERATIONS, TRAIN, HELD_OUT = 30, "+", 600, 200
SFT_MODEL = {"dim": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 48, "multiple_of": 32}


def build_arithmetic_sft(tmp: Path, sft_steps: int) -> dict[str, Path]:
    """A character tokenizer, a small 'sft' model trained on the train split (after 1,000 steps it has learnt the format
    and part of two-digit addition: it answers more than half of the held-out sums), and the split's task files where
    fetch writes them."""
    tmp.mkdir(parents=True, exist_ok=True)
    train, held_out = arithmetic_tasks(TRAIN, HELD_OUT, MAX_OPERAND, OPERATIONS, seed=0)
    (tmp / "fetch" / "arithmetic").mkdir(parents=True)
    for name, records in (("train", train), ("held_out", held_out)):
        (tmp / "fetch" / "arithmetic" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tok = train_tokenizer(tmp, [f"{r['prompt']} {r['answer']}" for r in train + held_out] * 4, model_type="char",
                          vocab_size=64, byte_fallback=False)  # fmt: skip
    meta = json.loads((tok / "tokenizer_meta.json").read_text())
    template = ChatTemplate(tok)
    examples = [template.encode([{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["answer"]}])
                for r in train]  # fmt: skip
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # this small a model only waits for a second thread, and on a busy machine for long
    model = GPT(ModelConfig(**SFT_MODEL, vocab_size=meta["vocab_size"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    order = np.random.default_rng(0)
    for _ in range(sft_steps):
        batch = [examples[i] for i in order.choice(len(examples), 32)]
        inputs, targets = (torch.from_numpy(a) for a in collate_examples(batch, template.ids["pad"]))
        loss = model(inputs, targets)[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    export(model.eval(), tmp / "sft", tok, meta["special_ids"])
    return {"sft": tmp / "sft", "fetch": tmp / "fetch"}


def accuracy(model_dir: Path, inputs: dict[str, Path], split: str) -> float:
    """Greedy exact-answer accuracy of a model on a split of the generated arithmetic set."""
    template = ChatTemplate(inputs["sft"])
    records = [
        json.loads(line) for line in (inputs["fetch"] / "arithmetic" / f"{split}.jsonl").read_text().splitlines()
    ]
    tasks = [(template.prompt([{"role": "user", "content": r["prompt"]}]), r["answer"]) for r in records]
    greedy = SamplingConfig(max_new_tokens=RUN["sampling"]["max_new_tokens"], temperature=0)
    return held_out_reward(load(model_dir), template, tasks, exact_answer, greedy)


RUN = {"iterations": 12, "rollout_batch": 8, "group_size": 8, "minibatch": 32, "epochs": 1, "eval_every": 12,
       "checkpoint_every": 4, "sampling": {"max_new_tokens": 4, "temperature": 1.0}, "kl": {"coef": 0.02},
       "optim": {"lr": 2e-3}}  # fmt: skip


# 300 iterations of 64 answers, two updates each: four passes over the 600 training prompts; a KL coefficient of 0.1
# keeps every iteration's estimate of the KL under 2 nats (at 0.02 a single iteration read 2.6)
LEARN = {"iterations": 300, "eval_every": 300, "checkpoint_every": 300, "kl": {"coef": 0.1}, "optim": {"lr": 1e-4}}


def run_grpo(inputs, out: Path, workers: int = 2, **overrides) -> dict:
    out.mkdir(parents=True)
    cfg = typed(grpo.GRPOConfig, {**RUN, **overrides})
    validate(cfg, "grpo.")
    resources = StageResources(num_workers=workers)
    return grpo.run(cfg, inputs, out, StageContext("grpo", resources=resources, quiet=True))


def curve(out: Path, key: str) -> list[float]:
    return [json.loads(line)[key] for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def arithmetic(tmp_path_factory) -> dict[str, Path]:
    return build_arithmetic_sft(tmp_path_factory.mktemp("grpo-inputs"), sft_steps=1000)


@pytest.fixture(scope="module")
def untrained(tmp_path_factory) -> dict[str, Path]:
    """The same inputs with an untrained model: what the checks before training need, in seconds."""
    return build_arithmetic_sft(tmp_path_factory.mktemp("grpo-untrained"), sft_steps=0)


def wrong_count(texts: list[str], references: list[str | None]) -> list[float]:
    return [0.0] * (len(texts) + 1)


def test_bad_input_fails_before_training(untrained, tmp_path):
    with pytest.raises(ConfigError, match="grpo.group_size"):
        run_grpo(untrained, tmp_path / "a", group_size=1)
    with pytest.raises(GptlineError, match=r"the reward function returned (\d+) scores for (?!\1)\d+ answers"):
        run_grpo(untrained, tmp_path / "b", reward="tests.test_grpo:wrong_count")
    with pytest.raises(GptlineError, match=r"grpo.prompts: .*train.jsonl:1: a prompt of \d+ tokens leaves no room"):
        run_grpo(untrained, tmp_path / "c", sampling={"max_new_tokens": 30})
    (tmp_path / "bare.jsonl").write_text('{"prompt": "What is 1 + 1?"}\n' * 8)
    with pytest.raises(GptlineError, match="fails on the prompts' records: exact_answer needs"):
        run_grpo(untrained, tmp_path / "d", prompts=[str(tmp_path / "bare.jsonl")])


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_held_out_accuracy_rises_clearly_above_sfts_with_the_kl_bounded(arithmetic, tmp_path, ray_session, seed):
    """Greedy accuracy on the held-out sums, which grpo never trains on, rises by at least 0.1 over sft's: the
    exact-answer reward sharpens the addition sft half learnt, not memorized answers. One worker: at this size a
    second only adds a process and an all-reduce."""
    before = {split: accuracy(arithmetic["sft"], arithmetic, split) for split in ("train", "held_out")}
    final = run_grpo(arithmetic, tmp_path / "grpo", workers=1, seed=seed, **LEARN)
    after = {split: accuracy(tmp_path / "grpo", arithmetic, split) for split in ("train", "held_out")}
    # Nats per answer of at most 4 tokens: each iteration's figure is an estimate over its 64 sampled answers, so
    # beside the largest the drift shows in the last fifth's mean and in the 95th percentile.
    kls = curve(tmp_path / "grpo", "kl")
    last_fifth = float(np.mean(kls[-len(kls) // 5 :]))
    p95 = float(np.percentile(kls, 95))
    accuracies = f"held-out accuracy {before['held_out']:.3f} -> {after['held_out']:.3f}"
    trained = f"trained prompts {before['train']:.3f} -> {after['train']:.3f}"
    drift = f"kl: last fifth's mean {last_fifth:.2f}, 95th percentile {p95:.2f}, max {max(kls):.2f}"
    print(f"seed {seed}: {accuracies}, {trained}; {drift}")
    assert after["held_out"] == pytest.approx(final["val_reward"])  # the stage measures what this test does
    assert after["held_out"] >= before["held_out"] + 0.1
    assert max(kls) < 2.0 and last_fifth < 0.5 and p95 < 1.0


@pytest.mark.slow
def test_resume_after_a_checkpoint_reproduces_the_uninterrupted_run(arithmetic, tmp_path, ray_session):
    short = {"iterations": 6, "checkpoint_every": 3, "eval_every": 3}
    run_grpo(arithmetic, tmp_path / "straight", **short)
    (ray_session.fault_dir / "grpo.after_checkpoint_3").touch()
    run_grpo(arithmetic, tmp_path / "resumed", **short)
    assert not (ray_session.fault_dir / "grpo.after_checkpoint_3").exists()  # the fault fired
    straight, resumed = (tmp_path / run / "train_log.jsonl" for run in ("straight", "resumed"))
    for key in ("reward_mean", "kl", "policy_loss", "val_reward"):
        a = [json.loads(line).get(key) for line in straight.read_text().splitlines()]
        b = [json.loads(line).get(key) for line in resumed.read_text().splitlines()]
        assert len(a) == len(b) == 6 and a == b, key
    wa, wb = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("straight", "resumed"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_grpo_is_opt_in_and_reads_the_reward_model_only_as_its_reward():
    from pipeline.config import compose_config
    from pipeline.dag import DAG, load_registry

    specs = load_registry("stages:REGISTRY")
    dag = DAG(specs)
    default = compose_config(specs, [])
    assert "grpo" not in dag.select(config=default)  # a plain run does not build it
    assert dag.select(until=["grpo"], config=default)[-2:] == ["sft", "grpo"]
    assert "rm" not in dag.select(until=["grpo"], config=default)
    assert dag.specs["grpo"].slots(default) == {"sft": "sft", "fetch": "fetch"}
    with_rm = compose_config(specs, ["grpo.reward=model"])
    assert dag.specs["grpo"].slots(with_rm) == {"sft": "sft", "fetch": "fetch", "rm": "rm"}


def test_fetch_keeps_the_evals_samples_with_one_number_as_the_answer(tmp_path):
    from stages import fetch

    samples = [
        {"input": [{"role": "system", "content": "Answer in brackets."}, {"role": "user", "content": "2 + 2?"}],
         "ideal": "[4.0000]"},
        {"input": [{"role": "user", "content": "LCM of 36 and 54?"}], "ideal": ["[108]", "[108.0]"]},
        {"input": [{"role": "user", "content": "Capital of France?"}], "ideal": "[Paris]"},
    ]  # fmt: skip
    data = "\n".join(json.dumps(s) for s in samples).encode()
    archive = fetch.ArchiveConfig(package="evals", version="1", filename="x.whl", sha256="0" * 64,
                                  convert="evals_answer")  # fmt: skip
    assert fetch.convert_evals_answer([("samples.jsonl", data)], tmp_path, archive) == 2
    records = [json.loads(line) for line in (tmp_path / "tasks.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in records] == ["4.0000", "108"]
    assert records[0]["messages"][0] == {"role": "system", "content": "Answer in brackets."}
    count = fetch.write_arithmetic(fetch.ArithmeticConfig(train=30, held_out=10, max_operand=5), tmp_path / "a")
    assert count == 40 and len((tmp_path / "a" / "held_out.jsonl").read_text().splitlines()) == 10

"""The dpo stage on a real Ray Train worker group: bad input refused before training (naming the file and record),
implicit-reward accuracy on held-out pairs of the default comparisons rising above chance over three seeds, and an
exact resume after a killed worker that reads the stored reference log-probabilities instead of computing them
again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from gptline.data.chat import Skipped, read_comparisons
from gptline.data.readers import MAX_LINE_BYTES
from gptline.model.export import export, load
from gptline.model.gpt import GPT, ModelConfig
from pipeline.config import DEFAULT_CONFIG_DIR, typed
from pipeline.dag import StageContext, StageResources
from pipeline.errors import GptlineError
from stages import dpo, fetch
from tests.identical import assert_identical_artifacts
from tests.test_tokenizer import train_tokenizer

MODEL = {"dim": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 256, "multiple_of": 32}


def chat_model(tmp: Path, tok: Path, seed: int) -> Path:
    """A randomly initialised language model exported like sft's artifact (the trunk dpo starts from)."""
    meta = json.loads((tok / "tokenizer_meta.json").read_text())
    torch.manual_seed(seed)
    export(GPT(ModelConfig(**MODEL, vocab_size=meta["vocab_size"])), tmp / f"sft-{seed}", tok, meta["special_ids"])
    return tmp / f"sft-{seed}"


@pytest.fixture(scope="module")
def comparisons(tmp_path_factory) -> dict[str, Path]:
    """The default run's comparisons (the fetch stage's preferences_evals pairs), a tokenizer trained on them, and
    the data directory."""
    registry = yaml.safe_load((DEFAULT_CONFIG_DIR / "fetch" / "registry.yaml").read_text())["archives"]
    tmp = tmp_path_factory.mktemp("dpo-data")
    cfg = typed(fetch.FetchConfig, {"archives": {"preferences_evals": registry["preferences_evals"]},
                                    "crawl": {"enabled": False}})  # fmt: skip
    (tmp / "fetched").mkdir()
    fetch.run(cfg, {}, tmp / "fetched", StageContext("fetch", quiet=True))
    data = tmp / "fetched" / "preferences_evals"
    pairs = read_comparisons([str(data / "pairs.jsonl")], "dpo.data", Skipped(), MAX_LINE_BYTES)
    texts = [m["content"] for p in pairs for m in p.prompt] + [p.chosen for p in pairs] + [p.rejected for p in pairs]
    return {"data": data, "tokenizer": train_tokenizer(tmp, texts, vocab_size=2048), "tmp": tmp}


def run_dpo(inputs: dict[str, Path], out: Path, workers: int = 1, **overrides) -> dict:
    out.mkdir(parents=True)
    cfg = typed(dpo.DPOConfig, {"data": ["{fetch}/*.jsonl"], "checkpoint_every": 1000, "sample_every": 0,
                                **overrides})  # fmt: skip
    return dpo.run(cfg, inputs, out, StageContext("dpo", resources=StageResources(num_workers=workers), quiet=True))


def log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_identical_answers_and_a_prompt_longer_than_the_context_are_refused_before_training(comparisons, tmp_path):
    model = chat_model(tmp_path, comparisons["tokenizer"], seed=0)
    bad = tmp_path / "bad"
    bad.mkdir()
    good = [{"prompt": f"Pick {i}", "chosen": "yes", "rejected": "no"} for i in range(20)]
    same = {"prompt": "Pick", "completions": ["a", "b", "a"], "ranking": [0, 1, 2]}  # the pair (0, 2) is a == a
    (bad / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*good, same]))
    with pytest.raises(GptlineError, match=r"dpo.data: .*bad/pairs.jsonl:21: the chosen and the rejected answer are "
                                           "the same text"):  # fmt: skip
        run_dpo({"sft": model, "fetch": bad}, tmp_path / "out1")
    long = {"prompt": "word " * 300, "chosen": "yes", "rejected": "no"}
    (bad / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*good, long]))
    with pytest.raises(GptlineError, match=r"bad/pairs.jsonl:21: the prompt is \d+ tokens, which leaves no room for "
                                           "an answer in 256"):  # fmt: skip
        run_dpo({"sft": model, "fetch": bad}, tmp_path / "out2")
    with pytest.raises(GptlineError, match="dpo.max_len=512 is longer than the SFT model's context of 256"):
        run_dpo({"sft": model, "fetch": bad}, tmp_path / "out3", max_len=512)
    assert not (tmp_path / "out1" / "train_log.jsonl").exists()


def test_dpo_pairs_hold_only_the_last_answer_trained_and_rankings_expand_with_weights(comparisons, tmp_path):
    template = dpo.ChatTemplate(comparisons["tokenizer"])
    data = tmp_path / "data"
    data.mkdir()
    ranking = {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                          {"role": "user", "content": "Name a colour"}],
               "completions": ["red", "blue", "a number"], "ranking": [1, 0, 2]}  # fmt: skip
    (data / "p.jsonl").write_text(json.dumps(ranking) + "\n" * 2 + json.dumps({"prompt": "Q", "chosen": "a"}) + "\n")
    cfg = typed(dpo.DPOConfig, {"data": ["{fetch}/*.jsonl"], "validation_fraction": 0.5})
    found = read_comparisons([str(data / "p.jsonl")], "dpo.data", Skipped(), MAX_LINE_BYTES)
    pairs = [(c.chosen, c.rejected, c.weight) for c in found]
    assert pairs == [("blue", "red", 1 / 3), ("blue", "a number", 1 / 3), ("red", "a number", 1 / 3)]
    with pytest.raises(GptlineError, match="both the training and the held-out split need at least one"):
        dpo.prepare(cfg, {"fetch": data}, template, 256)  # one ranking: all its pairs on one side
    prompt = template.prompt(found[0].prompt)
    ids, trained = dpo.answer_encoding(template, found[0].prompt, prompt, "blue", "p.jsonl:1")
    assert template.decode(ids[trained].tolist()) == "blue" and ids[trained][-1] == template.end_of_turn


@pytest.mark.slow
def test_dpo_raises_held_out_implicit_reward_accuracy_above_chance_over_three_seeds(comparisons, ray_session):
    """The CISSP and amateur-radio questions of the default comparisons (their first 2190 pairs; medmcqa and quartz
    follow), 30% of the prompts held out; one epoch at batch 32 from a random model; each seed its own model
    initialisation, split and data order. At step 0 the policy is the reference: every margin is 0 and the accuracy
    exactly 0.5. Every seed must end more than two standard errors of a coin flip over its held-out pairs above
    0.5. Figures in the log."""
    subset = comparisons["tmp"] / "cissp-fcc"
    subset.mkdir()
    lines = (comparisons["data"] / "pairs.jsonl").read_text().splitlines()
    (subset / "pairs.jsonl").write_text("\n".join(lines[:2190]) + "\n")
    above = []
    for seed in (0, 1, 2):
        model = chat_model(comparisons["tmp"], comparisons["tokenizer"], seed)
        out = comparisons["tmp"] / f"dpo-{seed}"
        final = run_dpo({"sft": model, "fetch": subset}, out, seed=seed, epochs=1, batch_size=32, eval_every=1000,
                        validation_fraction=0.3, optim={"lr": 1e-3, "warmup_steps": 5})  # fmt: skip
        held_out = json.loads((out / "data.json").read_text())["validation_pairs"]
        bar = 0.5 + 2 * 0.5 / held_out**0.5
        print(f"seed {seed}: {held_out} held-out pairs: accuracy {final['val_accuracy']:.3f} (bar {bar:.3f}) after "
              f"{final['steps']} steps, margin {final['val_margin']:.3f}, KL/token {final['val_kl']:.4f}, "
              f"chosen/rejected logp {final['val_chosen_logp']:.1f} / {final['val_rejected_logp']:.1f}")  # fmt: skip
        assert final["val_kl"] > 0
        above.append(final["val_accuracy"] > bar)
    assert all(above), above


# Every unversioned field of dpo's config, changed at once (tests/test_versioning.py checks the list).
UNVERSIONED_CHANGES = {"eval_every": 1, "eval_batches": 1, "sample_every": 1, "sample_tokens": 3, "keep_checkpoints": 1}


def test_dpo_unversioned_fields_leave_the_artifact_unchanged(comparisons, tmp_path, ray_session):
    model = chat_model(tmp_path, comparisons["tokenizer"], seed=0)
    data = tmp_path / "data"
    data.mkdir()
    lines = (comparisons["data"] / "pairs.jsonl").read_text().splitlines()
    (data / "pairs.jsonl").write_text("\n".join(lines[:80]) + "\n")
    base = {"steps": 4, "checkpoint_every": 2, "batch_size": 8}
    run_dpo({"sft": model, "fetch": data}, tmp_path / "a", **base)
    run_dpo({"sft": model, "fetch": data}, tmp_path / "b", **base, **UNVERSIONED_CHANGES)
    assert_identical_artifacts(tmp_path / "a", tmp_path / "b")


@pytest.mark.slow
def test_dpo_resume_after_a_killed_worker_reproduces_the_straight_run(comparisons, tmp_path, ray_session):
    model = chat_model(tmp_path, comparisons["tokenizer"], seed=0)
    data = tmp_path / "data"
    data.mkdir()
    lines = (comparisons["data"] / "pairs.jsonl").read_text().splitlines()
    (data / "pairs.jsonl").write_text("\n".join(lines[:160]) + "\n")  # a small file: this test is about the resume
    short = {"steps": 8, "eval_every": 4, "checkpoint_every": 4, "batch_size": 8}
    run_dpo({"sft": model, "fetch": data}, tmp_path / "straight", workers=2, **short)
    (ray_session.fault_dir / "dpo.after_checkpoint_4").touch()
    run_dpo({"sft": model, "fetch": data}, tmp_path / "resumed", workers=2, **short)
    assert not (ray_session.fault_dir / "dpo.after_checkpoint_4").exists()  # the fault fired
    a, b = (log(tmp_path / run) for run in ("straight", "resumed"))
    assert [r["step"] for r in b] == list(range(1, 9))
    assert all(abs(x[k] - y[k]) <= 1e-6 for x, y in zip(a, b, strict=True) for k in ("loss", "val_loss") if k in x)
    wa, wb = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("straight", "resumed"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # The reference log-probabilities were written once, before the first checkpoint, and read after the restart.
    reference = (tmp_path / "resumed" / dpo.REFERENCE).stat().st_mtime_ns
    checkpoint = next((tmp_path / "resumed").glob("transient/checkpoints/model/step-00000004")).stat().st_mtime_ns
    assert reference < checkpoint
    assert isinstance(load(tmp_path / "resumed"), GPT)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ipo", "simpo"])
def test_ipo_and_simpo_train_and_simpo_reads_no_reference(kind, comparisons, tmp_path, ray_session):
    model = chat_model(tmp_path, comparisons["tokenizer"], seed=0)
    data = tmp_path / "data"
    data.mkdir()
    (data / "pairs.jsonl").write_text("\n".join((comparisons["data"] / "pairs.jsonl").read_text().splitlines()[:160]))
    loss = {"kind": kind, "beta": 2.0 if kind == "simpo" else 0.1}
    final = run_dpo({"sft": model, "fetch": data}, tmp_path / kind, steps=4, eval_every=4, batch_size=8, loss=loss)
    records = log(tmp_path / kind)
    assert all(r["loss"] == r["loss"] for r in records) and 0 <= final["val_accuracy"] <= 1 and final["val_kl"] >= 0
    assert (tmp_path / kind / dpo.REFERENCE).exists() == (kind == "ipo")

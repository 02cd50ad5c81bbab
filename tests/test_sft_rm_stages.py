"""sft and rm as stages on a real Ray Train worker group: bad records skipped and counted, held-out metrics, LoRA
merged on export, exact resume after a killed worker, and an RM trained on real human preferences (HH) against
a length-only baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptline.data.chat import Skipped, read_comparisons
from gptline.data.formats import REWARD_STATS
from gptline.data.readers import MAX_LINE_BYTES
from gptline.model.export import export, load
from gptline.model.gpt import GPT, ModelConfig, ScalarModel
from pipeline.config import typed
from pipeline.dag import StageContext, StageResources
from pipeline.errors import GptlineError
from stages import rm, sft
from tests.identical import assert_identical_artifacts
from tests.test_tokenizer import SHAKESPEARE, shakespeare_docs, train_tokenizer

SHARED = SHAKESPEARE.parent.parent
SEED_TASKS = SHARED / "sft" / "self-instruct-seed-tasks.jsonl"
HH = SHARED / "preferences" / "hh-rlhf-harmless-base-test.jsonl.gz"
MODEL = {"dim": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 192, "multiple_of": 32}
SMALL = {"steps": 8, "batch_size": 8, "eval_every": 4, "eval_batches": 4, "sample_every": 8, "sample_tokens": 8,
         "checkpoint_every": 4, "validation_fraction": 0.15, "optim": {"lr": 3e-3, "warmup_steps": 2}}  # fmt: skip


def needs(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs {path} (the shared real-data folder beside the checkout)")
    return path


def base_model(tmp: Path, tok: Path, **dims) -> Path:
    """A randomly initialised language model exported like pretrain's artifact."""
    meta = json.loads((tok / "tokenizer_meta.json").read_text())
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**MODEL, **dims}, vocab_size=meta["vocab_size"]))
    export(model, tmp / "base", tok, meta["special_ids"])
    return tmp / "base"


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer, a base model, and conversation files: the self-instruct seed tasks plus bad records."""
    tmp = tmp_path_factory.mktemp("sft-inputs")
    records = []
    for line in needs(SEED_TASKS).read_text().splitlines():
        task = json.loads(line)
        for instance in task["instances"]:
            prompt = task["instruction"] + (f"\n\n{instance['input']}" if instance["input"] else "")
            records.append({"prompt": prompt, "response": instance["output"]})
    tok = train_tokenizer(tmp, shakespeare_docs()[:500] + [r["prompt"] + r["response"] for r in records],
                          vocab_size=800)  # fmt: skip
    records += [{"prompt": "no answer"}, {"prompt": "empty", "response": ""}, {"prompt": "x" * 5000, "response": "y"}]
    data = tmp / "data"
    data.mkdir()
    (data / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + "{broken\n")
    return {"tokenizer": tok, "pretrain": base_model(tmp, tok), "fetch": data}


def run_sft(chat_data, out: Path, workers: int = 2, **overrides) -> dict:
    out.mkdir(parents=True)
    cfg = typed(sft.SFTConfig, {**SMALL, "data": ["{fetch}/*.jsonl"], **overrides})
    ctx = StageContext("sft", resources=StageResources(num_workers=workers), quiet=True)
    return sft.run(cfg, chat_data, out, ctx)


def log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_sft_trains_on_conversations_skipping_bad_records(chat_data, tmp_path, ray_session):
    final = run_sft(chat_data, tmp_path / "sft")
    data = json.loads((tmp_path / "sft" / "data.json").read_text())
    skipped = {reason: entry["count"] for reason, entry in data["skipped"].items()}
    too_long = skipped.pop("longer_than_context")  # the 5000-character prompt and some long seed tasks
    assert skipped == {"missing_response": 1, "empty_response": 1, "invalid_json": 1} and too_long >= 1
    assert final["skipped_records"] == 3 + too_long and data["validation_examples"] > 0
    records = log(tmp_path / "sft")
    assert records[-1]["loss"] < records[0]["loss"] and final["val_loss"] < records[0]["loss"]
    assert records[-1]["samples"] and " -> " in records[-1]["samples"][0]
    model = load(tmp_path / "sft")
    assert isinstance(model, GPT) and (tmp_path / "sft" / "tokenizer_meta.json").exists()


# Every unversioned field of sft's and rm's configs, changed from SMALL at once (tests/test_versioning.py checks it).
TRAINING_CHANGES = {"eval_every": 1, "eval_batches": 1, "sample_every": 1, "sample_tokens": 3, "keep_checkpoints": 1}
SFT_CHANGES = {**TRAINING_CHANGES, "num_samples": 1}
RM_CHANGES = TRAINING_CHANGES


def test_sft_unversioned_fields_leave_the_artifact_unchanged(chat_data, tmp_path, ray_session):
    base = {"steps": 4, "checkpoint_every": 2}
    run_sft(chat_data, tmp_path / "a", workers=1, **base)
    run_sft(chat_data, tmp_path / "b", workers=1, **base, **SFT_CHANGES)
    assert len(log(tmp_path / "b")[0]["samples"]) == 1
    assert_identical_artifacts(tmp_path / "a", tmp_path / "b")


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.slow)])
def test_sft_with_lora_changes_only_the_adapted_layers_and_exports_plain_weights(
    chat_data, tmp_path, ray_session, precision
):
    """In bf16 too: the frozen base weights come from the base artifact, not from the engine's bf16 copy of them."""
    lora = {"rank": 4, "target_modules": ["q_proj", "v_proj"]}
    run_sft(chat_data, tmp_path / "lora", workers=1, steps=4, lora=lora, deepspeed={"precision": precision})
    base, tuned = (load_file(str(p / "model.safetensors")) for p in (chat_data["pretrain"], tmp_path / "lora"))
    assert base.keys() == tuned.keys()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)


def test_sft_input_errors_are_clear(chat_data, tmp_path):
    cfg = typed(sft.SFTConfig, {**SMALL, "data": ["{fetch}/*.jsonl"], "max_len": 4096})
    with pytest.raises(GptlineError, match="sft.max_len=4096 is longer than the pretrained model's context of 192"):
        sft.run(cfg, chat_data, tmp_path, StageContext("sft"))
    cfg = typed(sft.SFTConfig, {**SMALL, "data": ["{fetch}/nothing-*.jsonl"]})
    with pytest.raises(GptlineError, match=r"sft.data\[0\]: no file matches"):
        sft.run(cfg, chat_data, tmp_path, StageContext("sft"))


@pytest.mark.slow
def test_sft_resume_after_a_killed_worker_reproduces_the_straight_run(chat_data, tmp_path, ray_session):
    run_sft(chat_data, tmp_path / "straight")
    (ray_session.fault_dir / "sft.after_checkpoint_4").touch()
    run_sft(chat_data, tmp_path / "resumed")
    assert not (ray_session.fault_dir / "sft.after_checkpoint_4").exists()  # the fault fired
    a, b = ([r["loss"] for r in log(tmp_path / run)] for run in ("straight", "resumed"))
    assert len(a) == len(b) == 8 and max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-6
    wa, wb = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("straight", "resumed"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def rankings(tmp: Path) -> Path:
    prefs = tmp / "prefs"
    prefs.mkdir(exist_ok=True)
    records = [{"prompt": f"Name a number near {i}.", "completions": [str(i), str(i + 50), "banana", "?"],
                "ranking": [0, 1, 2, 3]} for i in range(40)]  # fmt: skip
    records += [{"prompt": "Q", "chosen": "fine"}, {"prompt": "Q", "completions": ["a", "b"], "ranking": [1, 1]}]
    (prefs / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return prefs


def run_rm(chat_data, prefs: Path, out: Path, workers: int = 2, **overrides) -> dict:
    sft_dir = chat_data["pretrain"]  # any exported language model with the tokenizer files serves as the trunk
    out.mkdir()
    cfg = typed(rm.RMConfig, {"data": ["{fetch}/*.jsonl"], "steps": 4, "batch_size": 8, "eval_every": 4,
                              "checkpoint_every": 4, "validation_fraction": 0.2, **overrides})  # fmt: skip
    ctx = StageContext("rm", resources=StageResources(num_workers=workers), quiet=True)
    return rm.run(cfg, {"sft": sft_dir, "fetch": prefs}, out, ctx)


def test_rm_unversioned_fields_leave_the_artifact_unchanged(chat_data, tmp_path, ray_session):
    prefs = rankings(tmp_path)
    run_rm(chat_data, prefs, tmp_path / "a", workers=1, checkpoint_every=2)
    run_rm(chat_data, prefs, tmp_path / "b", workers=1, checkpoint_every=2, **RM_CHANGES)
    assert "val_accuracy" in log(tmp_path / "b")[0]
    assert_identical_artifacts(tmp_path / "a", tmp_path / "b")


def test_rm_stage_on_rankings_writes_reward_statistics(chat_data, tmp_path, ray_session):
    out = tmp_path / "rm"
    final = run_rm(chat_data, rankings(tmp_path), out)
    data = json.loads((out / "data.json").read_text())
    assert data["train_pairs"] + data["validation_pairs"] == 240  # 40 rankings of 4: 6 pairs each
    assert final["skipped_records"] == 2 and 0 <= final["val_accuracy"] <= 1
    stats = json.loads((out / REWARD_STATS).read_text())
    assert stats["std"] > 0 and stats["mean"] == pytest.approx(final["reward_mean"])
    assert isinstance(load(out), ScalarModel)


@pytest.mark.slow
def test_rm_on_human_preferences_beats_chance_and_the_length_baseline(tmp_path, ray_session):
    """Most of the HH harmless pairs for training, a fifth held out (split by prompt). Figures in the log."""
    skipped = Skipped()
    pairs = read_comparisons([str(needs(HH))], "rm.data", skipped, MAX_LINE_BYTES)
    texts = [m["content"] for p in pairs for m in p.prompt] + [p.chosen for p in pairs] + [p.rejected for p in pairs]
    tok = train_tokenizer(tmp_path, texts, vocab_size=2048)
    trunk = base_model(tmp_path, tok, dim=128, max_seq_len=512)
    out = tmp_path / "rm"
    out.mkdir()
    cfg = typed(rm.RMConfig, {"data": [str(HH)], "epochs": 1, "batch_size": 16, "eval_every": 25,
                              "checkpoint_every": 1000, "validation_fraction": 0.2,
                              "optim": {"lr": 3e-4, "warmup_steps": 20, "weight_decay": 0.0}})  # fmt: skip
    ctx = StageContext("rm", resources=StageResources(num_workers=1, cpus_per_worker=2), quiet=True)
    final = rm.run(cfg, {"sft": trunk}, out, ctx)
    # The length-only baseline on the same held-out pairs: the longer answer wins (ties count half).
    template_pairs, _ = rm.prepare(cfg, {"sft": trunk}, rm.ChatTemplate(trunk), 512)
    held_out = template_pairs["validation"]
    longer = sum((len(c) > len(r)) + 0.5 * (len(c) == len(r)) for c, r, _ in held_out) / len(held_out)
    print(f"HH held-out pairs {len(held_out)}: RM accuracy {final['val_accuracy']:.3f}, length baseline {longer:.3f}")
    assert final["val_accuracy"] > 0.56 and final["val_accuracy"] > longer + 0.05

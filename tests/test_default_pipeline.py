"""The default pipeline as `make run` runs it (slow group), with fewer training steps: registry downloads, the
pydoc crawl, crawl-mix, tokenizer, tokenize, pretrain, sft, rm, ppo, evaluate, and the run report."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.artifacts import Store


@pytest.mark.slow
def test_default_pipeline_builds_the_corpus_from_registry_data(tmp_path, default_data, capsys):
    from gptline.cli.main import main

    store = default_data  # fetch..tokenize built by the fixture with the same defaults; this run reuses them
    shorter = {
        "pretrain.steps": 30,
        "pretrain.eval_every": 15,
        "sft.steps": 20,
        "sft.eval_every": 10,
        "rm.steps": 20,
        "rm.eval_every": 10,
        "ppo.iterations": 3,
        "evaluate.verifiable.tasks": 50,
        "evaluate.num_prompts": 24,
        "evaluate.perplexity_tokens": 16384,
    }
    short = [f"{key}={value}" for key, value in shorter.items()]
    assert main(["run", f"store.root={store}", "tracking=disabled", *short]) == 0
    out = capsys.readouterr().out
    assert "crawl_mix" in out and "done" in out
    [fetch] = Store(str(store)).list("fetch")
    sources = json.loads((Path(fetch.path) / "sources.json").read_text())
    assert set(sources["archives"]) == {"wikipedia", "books", "code_requests", "code_click", "qa", "sft_chatterbot",
                                        "sft_evals", "preferences_evals", "verifiable_evals"}  # fmt: skip
    assert sources["crawl"]["fetched"] >= 100
    [corpus] = Store(str(store)).list("crawl_mix")
    stats = json.loads((Path(corpus.path) / "stats.json").read_text())
    assert set(stats["sources"]) == {"web", "wikipedia", "books", "code", "qa"}
    assert stats["totals"]["max_mixture_error_pp"] < 2
    assert all(s["mixed_docs"] > 0 for s in stats["sources"].values())
    train = pq.read_table(str(Path(corpus.path) / "train"))
    assert train.num_rows == stats["totals"]["train_docs"] and train.num_rows > 100

    # tokenizer: lossless on every document of the default corpus, and the Hugging Face export agrees on ids.
    import sentencepiece as spm
    from transformers import AutoTokenizer

    [tok] = Store(str(store)).list("tokenizer")
    sp = spm.SentencePieceProcessor(model_file=str(Path(tok.path) / "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(tok.path)
    documents = (
        train.column("text").to_pylist()
        + pq.read_table(str(Path(corpus.path) / "validation")).column("text").to_pylist()
    )
    ids = sp.encode(documents)
    assert [sp.decode(i) for i in ids] == documents
    assert [hf.encode(d, add_special_tokens=False) for d in documents] == ids
    [tokens] = Store(str(store)).list("tokenize")
    summary = json.loads((Path(tokens.path) / "tokens.json").read_text())
    assert summary["train"]["tokens"] == sum(len(i) + 1 for i in ids[: train.num_rows])

    # pretrain: the loss falls, and transformers loads the export and generates from it.
    from transformers import AutoModelForCausalLM

    [model] = Store(str(store)).list("pretrain")
    log = [json.loads(line) for line in (Path(model.path) / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 31)) and log[-1]["loss"] < log[0]["loss"] - 0.5
    assert "val_loss" in log[-1] and len(log[-1]["samples"]) == 3
    llama = AutoModelForCausalLM.from_pretrained(model.path)
    prompt = hf("The history of", return_tensors="pt").input_ids
    assert llama.generate(prompt, max_new_tokens=5, do_sample=False).shape[1] == prompt.shape[1] + 5

    # sft: conversations from registry files, the loss falls, the model answers held-out prompts.
    [tuned] = Store(str(store)).list("sft")
    data = json.loads((Path(tuned.path) / "data.json").read_text())
    assert data["train_examples"] > 1000 and data["validation_examples"] > 50
    log = [json.loads(line) for line in (Path(tuned.path) / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"] and "val_loss" in log[-1] and log[-1]["samples"]

    # rm: preference pairs derived from multiple-choice questions; held-out accuracy and reward statistics.
    [reward] = Store(str(store)).list("rm")
    data = json.loads((Path(reward.path) / "data.json").read_text())
    assert data["train_pairs"] > 1000
    stats = json.loads((Path(reward.path) / "reward_stats.json").read_text())
    assert stats["std"] > 0 and reward.manifest["metrics"]["val_accuracy"] > 0

    # ppo: the real chain sft -> rm -> ppo on the held-out SFT prompts, every metric logged.
    [policy] = Store(str(store)).list("ppo")
    log = [json.loads(line) for line in (Path(policy.path) / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    for key in (
        "reward_mean",
        "reward_std",
        "kl",
        "entropy",
        "answer_length",
        "policy_clipfrac",
        "value_clipfrac",
        "approx_kl",
        "value_error",
        "beta",
    ):
        assert all(math.isfinite(r[key]) for r in log), key
    assert log[0]["samples"] and policy.manifest["metrics"]["entropy_first"] > 0

    # evaluate: every model judged on held-out prompts; the sft-vs-sft control is a coin flip within noise.
    [evaluation] = Store(str(store)).list("evaluate")
    result = json.loads((Path(evaluation.path) / "evaluation.json").read_text())
    control = next(m for m in result["matchups"] if m["a"] == "sft_resample")
    assert abs(control["win_rate"] - 0.5) <= 3 * control["stderr"] + 1e-9
    assert set(result["elo"]) == {"base", "sft", "ppo", "best_of_n"}
    assert result["reward_model"]["accuracy"] == pytest.approx(reward.manifest["metrics"]["val_accuracy"], abs=1e-3)
    for name in ("arithmetic", "evals_math"):  # both of the default fetch's verifiable sets, read by evaluate
        held_out = result["verifiable"][name]
        assert held_out["tasks"] == 50 and set(held_out["accuracy"]) == {"sft", "ppo"}

    # the report: every stage's section, and in headless Chromium the charts are drawn.
    from tests.test_report import colour_pixels, screenshot

    page = Path([line for line in out.splitlines() if line.startswith("report:")][-1].split(maxsplit=1)[1])
    html = page.read_text()
    for title in ("mixture: target vs achieved", "tokens per source", "KL to sft", "win rate judged by the reward",
                  "answers side by side"):  # fmt: skip
        assert title in html, title
    png = screenshot(page, tmp_path / "report.png", height=12000)
    assert colour_pixels(png, "#1f77b4") > 50_000 and colour_pixels(png, "#d62728") > 5_000

    # a 2-point sweep over a PPO knob, points at once: pretrain, sft and rm are reused by every point, ppo built 2x.
    capsys.readouterr()
    sweep = ["-m", "ppo.kl.coef=0.02,0.5", "--parallel", "2", "--until", "ppo"]
    assert main(["run", f"store.root={store}", "tracking=disabled", *short, "ppo.iterations=1", *sweep]) == 0
    out = capsys.readouterr().out
    [shared] = [line for line in out.splitlines() if line.startswith("shared by every point:")]
    assert all(f"{stage}/" in shared for stage in ("pretrain", "sft", "rm"))
    runs = sorted((store / "runs").iterdir())[-2:]
    states = [{s: json.loads((r / "nodes" / f"{s}.json").read_text())["state"] for s in ("pretrain", "sft", "rm", "ppo")}
              for r in runs]  # fmt: skip
    assert states == [{"pretrain": "reused", "sft": "reused", "rm": "reused", "ppo": "done"}] * 2
    assert len(Store(str(store)).list("ppo")) == 3  # the first run's and one per point


@pytest.mark.slow
def test_two_fresh_stores_build_the_default_data_byte_for_byte_alike(tmp_path, default_data):
    """The default fetch (registry files and the pydoc crawl), crawl_mix, tokenizer and tokenize, built again in a
    fresh store: the same versions and the same sha256 for every file as the session's default build."""
    from gptline.cli.main import main

    store = tmp_path / "store"
    assert main(["run", f"store.root={store}", "tracking=disabled", "run.quiet=true", "--until", "tokenize"]) == 0
    data_stages = {"fetch", "crawl_mix", "tokenizer", "tokenize"}
    built = [{a.stage: a for a in Store(str(s)).list() if a.stage in data_stages} for s in (default_data, store)]
    assert set(built[0]) == set(built[1]) == data_stages
    for stage, a in built[0].items():
        b = built[1][stage]
        assert a.version == b.version
        differ = sorted(f for f in a.manifest["files"].keys() | b.manifest["files"].keys()
                        if a.manifest["files"].get(f) != b.manifest["files"].get(f))  # fmt: skip
        assert differ == [], f"{stage}/{a.version}: these files differ between the two builds"
        assert a.manifest["content"] == b.manifest["content"]

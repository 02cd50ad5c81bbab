"""Bringing a Hugging Face model in and serving what was trained: random Llama models saved by transformers in
several shapes imported with equal logits and generations, a real pretrained tokenizer from a registry package,
bad inputs refused before any work, the exported chat template against ChatTemplate on the default data, sft from
an imported model through the CLI (its first loss against transformers'), and transformers' text-generation
pipeline against `gptline chat`."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from gptline.data.chat import ChatTemplate, Skipped, read_comparisons, read_conversations
from gptline.data.readers import MAX_LINE_BYTES
from gptline.model.export import export, load
from gptline.model.generate import SamplingConfig, generate
from gptline.model.hf_import import import_model, inspect
from pipeline.config import DEFAULT_CONFIG_DIR, typed
from pipeline.dag import StageContext
from stages import fetch

ROOT = Path(__file__).resolve().parent.parent
SHARED_SFT = ROOT.parent / "shared" / "data" / "sft" / "self-instruct-seed-tasks.jsonl"
LLAMA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 4, "max_position_embeddings": 160, "rms_norm_eps": 1e-5}  # fmt: skip
SHAPES = {
    "multi-head": {},
    "multi-head-sharded": {"max_shard_size": "200KB"},  # model.safetensors.index.json and its shards
    "grouped-query": {"num_key_value_heads": 2},
    "tied-embeddings": {"tie_word_embeddings": True},
    "odd-intermediate-size": {"intermediate_size": 97},
    "rope-theta": {"rope_theta": 500000.0, "num_key_value_heads": 1},
}
# mistral-common's wheel ships Mistral's instruct tokenizer (a sentencepiece model with control tokens of its own:
# [INST], [/INST], [TOOL_CALLS], ...); Apache-2.0 (DATA.md).
MISTRAL = fetch.ArchiveConfig(
    package="mistral-common",
    version="1.13.1",
    filename="mistral_common-1.13.1-py3-none-any.whl",
    sha256="98b4d0755b8d90bf4691fa8f1b70cb3b4a8cd4dc1653c4ed08ef3d1c7d2c29af",
    members=["mistral_common/data/mistral_instruct_tokenizer_240323.model.v3"],
)


def save_llama(directory: Path, tokenizer_files: dict[str, bytes], vocab_size: int, seed: int = 0,
               max_shard_size: str | None = None, **overrides):  # fmt: skip
    """A random LlamaForCausalLM saved by transformers (norms away from 1, so a wrong mapping cannot hide)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **{**LLAMA, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    for name, data in tokenizer_files.items():
        (directory / name).write_bytes(data)
    return model


def imported(source: Path, out: Path) -> Path:
    out.mkdir(parents=True)
    import_model(inspect(str(source)), out)
    return out


def default_data(tmp_path_factory) -> tuple[list[list[dict]], list]:
    """The conversations and comparisons of the default run (the fetch stage's sft and preference data) and the
    shared self-instruct seed tasks as prompt/response conversations."""
    registry = yaml.safe_load((DEFAULT_CONFIG_DIR / "fetch" / "registry.yaml").read_text())["archives"]
    chosen = {k: v for k, v in registry.items() if k in ("sft_chatterbot", "sft_evals", "preferences_evals")}
    out = tmp_path_factory.mktemp("default-data")
    cfg = typed(fetch.FetchConfig, {"archives": chosen, "crawl": {"enabled": False}})
    fetch.run(cfg, {}, out, StageContext("fetch", quiet=True))
    skipped = Skipped()
    conversations = read_conversations([str(out / "sft_*" / "*.jsonl")], "sft.data", skipped, MAX_LINE_BYTES)
    comparisons = read_comparisons([str(out / "preferences_evals" / "*.jsonl")], "rm.data", skipped, MAX_LINE_BYTES)
    if SHARED_SFT.exists():
        conversations += [[{"role": "user", "content": t["instruction"] + (f"\n\n{i['input']}" if i["input"] else "")},
                           {"role": "assistant", "content": i["output"]}]
                          for t in map(json.loads, SHARED_SFT.read_text().splitlines()) for i in t["instances"]]  # fmt: skip
    assert not skipped.counts and len(conversations) > 2000 and len(comparisons) > 6000
    return conversations, comparisons


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return default_data(tmp_path_factory)


@pytest.fixture(scope="module")
def tok_files(tok) -> dict[str, bytes]:
    """A tokenizer.json as a Hugging Face model directory has it (ours, trained by the tokenizer stage)."""
    return {"tokenizer.json": (tok / "tokenizer.json").read_bytes()}


# ---- random models saved by transformers -----------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
def test_imported_llama_matches_transformers_and_round_trips_bit_for_bit(shape, tok_files, tmp_path):
    reference = save_llama(tmp_path / "hf", tok_files, 416, **SHAPES[shape])  # 16 spare embedding rows
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists() == ("sharded" in shape)
    ours = load(imported(tmp_path / "hf", tmp_path / "import")).eval()
    tokens = torch.randint(0, 416, (3, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        difference = (ours(tokens)[0] - reference(tokens).logits).abs().max().item()
    assert difference < 1e-5, difference

    prompts = [[5, 17, 42, 8, 99, 23, 7], [300, 12], [1, 2, 3, 4]]  # left-padded into one batch by both
    greedy = generate(ours, prompts, SamplingConfig(max_new_tokens=24, temperature=0), pad_id=3)
    width = max(map(len, prompts))
    ids = torch.tensor([[3] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    theirs = reference.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, eos_token_id=None,
                                pad_token_id=3)[:, width:].tolist()  # fmt: skip
    assert greedy == theirs

    special = json.loads((tmp_path / "import" / "tokenizer_meta.json").read_text())["special_ids"]
    export(ours, tmp_path / "export", tmp_path / "import", special)
    again = load(imported(tmp_path / "export", tmp_path / "reimport"))
    first, second = ours.state_dict(), again.state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert load_file(str(tmp_path / "export" / "model.safetensors")).keys() == load_file(
        str(tmp_path / "reimport" / "model.safetensors")).keys()  # fmt: skip


def chatml_tokenizer(tmp: Path, docs: list[str]) -> dict[str, bytes]:
    """A byte-level BPE tokenizer.json with ChatML tokens of its own and a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    backend.train_from_iterator(docs, trainer)
    backend.save(str(tmp / "chatml.json"))
    template = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
                "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                "{% endif %}")  # fmt: skip
    config = {"chat_template": template, "eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"}
    return {"tokenizer.json": (tmp / "chatml.json").read_bytes(), "tokenizer_config.json": json.dumps(config).encode()}


def test_added_tokens_take_spare_rows_at_the_mean_and_a_models_own_template_is_the_one_used(data, tmp_path):
    from transformers import AutoTokenizer

    conversations, _ = data
    files = chatml_tokenizer(tmp_path, [m["content"] for c in conversations[:1500] for m in c])
    own = json.loads(files["tokenizer.json"])["model"]["vocab"]
    hf = save_llama(tmp_path / "hf", files, len(own) + 8)  # 8 spare rows: the 5 tokens added fit in them
    out = imported(tmp_path / "hf", tmp_path / "import")
    template = ChatTemplate(out)
    assert template.own_template and template.tokens["end_of_turn"] == "<|im_end|>"
    assert template.ids["end_of_text"] == own["<|endoftext|>"]
    added = [template.ids[name] for name in ("pad", "system", "user", "assistant", "reward")]
    assert sorted(added) == list(range(len(own), len(own) + 5))
    weights = load_file(str(out / "model.safetensors"))
    embed, head = weights["model.embed_tokens.weight"], weights["lm_head.weight"]
    assert embed.shape[0] == len(own) + 8  # no growth
    original = hf.model.embed_tokens.weight.detach()
    assert torch.allclose(embed[added], original[: len(own)].mean(0).expand(5, -1))
    assert torch.equal(embed[: len(own)], original[: len(own)]) and torch.equal(embed[len(own) + 5 :],
                                                                               original[len(own) + 5 :])  # fmt: skip
    assert torch.allclose(head[added], hf.lm_head.weight.detach()[: len(own)].mean(0).expand(5, -1))

    reference = AutoTokenizer.from_pretrained(str(out))
    for messages in conversations[:300]:
        ids, trained = template.encode(messages)
        expected = reference.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert ids.tolist() == expected
        prompt = reference.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True,
                                               return_dict=True)["input_ids"]  # fmt: skip
        assert template.prompt(messages[:-1]) == prompt
        answer = ids[len(prompt) :][trained[len(prompt) :]].tolist()  # the last answer and its end-of-turn token
        assert answer[-1] == template.end_of_turn and template.decode(answer) == messages[-1]["content"]
        assert not trained[: len(prompt)][-1]


# ---- a real pretrained tokenizer -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mistral_model(tmp_path_factory) -> Path:
    """A random Llama with Mistral's real instruct tokenizer (from the mistral-common wheel), imported."""
    tmp = tmp_path_factory.mktemp("mistral")
    wheel = fetch.download(MISTRAL, Path("~/.cache/gptline/downloads").expanduser(), "mistral")
    [(_, model_file)] = fetch.archive_members(wheel, MISTRAL.members)
    save_llama(tmp / "hf", {"tokenizer.model": model_file}, 32768)
    return imported(tmp / "hf", tmp / "import")


def test_a_real_pretrained_tokenizer_imports_with_our_tokens_added_and_is_lossless(mistral_model, data):
    template = ChatTemplate(mistral_model)
    tokenizer = template.tokenizer
    assert tokenizer.token_id("[INST]") == 3 and tokenizer.token_id("[/INST]") == 4  # its own special tokens stay
    assert [template.ids[k] for k in ("bos", "end_of_text")] == [1, 2] and not template.own_template
    added = sorted(template.ids[k] for k in ("pad", "system", "user", "assistant", "end_of_turn", "reward"))
    assert added == list(range(32768, 32774)) and tokenizer.vocab_size == 32774
    assert load(mistral_model).cfg.vocab_size == 32774
    assert 3 not in tokenizer.encode("[INST] typed by a user") and template.ids["user"] not in tokenizer.encode(
        "<|user|> too")  # fmt: skip
    conversations, comparisons = data
    texts = [m["content"] for c in conversations for m in c]
    texts += [m["content"] for c in comparisons for m in c.prompt] + [c.chosen for c in comparisons]
    texts += [c.rejected for c in comparisons]
    assert [t for t in texts if tokenizer.decode(tokenizer.encode(t)) != t] == []
    for messages in conversations:
        ids, trained = template.encode(messages)
        assert template.messages(ids.tolist()) == messages
        assert trained.sum() == sum(len(tokenizer.encode(m["content"])) + 1 for m in messages
                                    if m["role"] == "assistant")  # fmt: skip


# ---- the exported template -------------------------------------------------------------------------------------
def test_exported_chat_template_gives_chat_template_ids_for_every_conversation_shape(tok, data, tmp_path):
    """transformers' apply_chat_template on an export against ChatTemplate: every conversation of the default SFT
    data (system or not, one or many turns), with and without the generation prompt, and every preference pair's
    prompt and answers; the assistant mask of the template's {% generation %} blocks is the trained mask."""
    from transformers import AutoTokenizer

    meta = json.loads((tok / "tokenizer_meta.json").read_text())
    from gptline.model.gpt import GPT, ModelConfig

    model = GPT(ModelConfig(dim=32, n_layers=1, n_heads=4, multiple_of=16, vocab_size=meta["vocab_size"]))
    export(model, tmp_path, tok, meta["special_ids"])
    template, reference = ChatTemplate(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    conversations, comparisons = data
    pairs = [[*c.prompt, {"role": "assistant", "content": answer}] for c in comparisons
             for answer in (c.chosen, c.rejected)]  # fmt: skip
    shapes = set()
    for messages in conversations + pairs:
        shapes.add(tuple(m["role"] for m in messages))
        ids, trained = template.encode(messages)
        rendered = reference.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                 return_assistant_tokens_mask=True)  # fmt: skip
        assert rendered["input_ids"] == ids.tolist()
        assert rendered["assistant_masks"] == trained.astype(int).tolist()
        for turn in range(1, len(messages)):
            if messages[turn]["role"] == "assistant":
                prompt = reference.apply_chat_template(messages[:turn], tokenize=True, add_generation_prompt=True,
                                                       return_dict=True)["input_ids"]  # fmt: skip
                assert prompt == template.prompt(messages[:turn])
    assert ("system", "user", "assistant") in shapes and ("user", "assistant", "user", "assistant") in shapes
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert template.end_of_turn in generation["eos_token_id"]


# ---- bad input -------------------------------------------------------------------------------------------------
def bad_model(kind: str, root: Path, tok_files: dict[str, bytes]) -> Path:
    path = root / kind
    if kind == "no_such_directory":
        return path
    overrides = {"rope_scaling": {"rope_type": "linear", "factor": 2.0}} if kind == "rope_scaling" else {}
    overrides |= {"attention_bias": True} if kind == "biases" else {}
    overrides |= {"head_dim": 32} if kind == "head_dim" else {}
    model = save_llama(path, tok_files, 200 if kind == "vocabulary" else 416, **overrides)
    if kind == "missing_tokenizer":
        (path / "tokenizer.json").unlink()
    if kind == "pickle_only":
        (path / "model.safetensors").unlink()
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    if kind == "architecture":
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"],
                                                      "model_type": "mistral"}))  # fmt: skip
    if kind == "truncated":
        weights = path / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-1000])
    return path


BAD = {
    "no_such_directory": "no_such_directory: no such directory",
    "missing_tokenizer": r"tokenizer.json: missing \(the model directory has no tokenizer.json or tokenizer.model\)",
    "pickle_only": r"pytorch_model.bin: a pickle checkpoint; gptline reads safetensors only .*save_pretrained\(OUT, "
    r"safe_serialization=True\)",
    "architecture": r"config.json: architecture \['MistralForCausalLM'\] .* is not supported",
    "vocabulary": "tokenizer.json: mismatched vocabulary sizes: the tokenizer has 400 tokens but the weights have "
    "200 embedding rows",
    "truncated": r"model.safetensors: truncated safetensors file: \d+ bytes where its header describes \d+",
    "rope_scaling": "config.json: rope scaling .*linear.* is not supported",
    "biases": "config.json: attention_bias=true is not supported",
    "head_dim": r"config.json: head_dim=32 is not hidden_size / num_attention_heads = 64/4",
}


def store_state(store: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(store)), p.stat().st_size) for p in store.rglob("*")) if store.exists() else []


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_is_refused_before_any_work_and_the_store_is_unchanged(kind, tok_files, tmp_path, capsys):
    from gptline.cli.main import main

    path = bad_model(kind, tmp_path / "models", tok_files)
    store = tmp_path / "store"
    (store / "fetch" / ("0" * 12)).mkdir(parents=True)  # something already there
    before = store_state(store)
    capsys.readouterr()  # transformers' progress bars
    for command in (["import", str(path)], ["run", "base_model=hf", f"base_model.path={path}", "--until", "sft"]):
        code = main([*command, f"store.root={store}", "tracking=disabled"])
        assert code == 2
        error = capsys.readouterr().err
        assert error.startswith("gptline: error: ") and len(error.strip().splitlines()) == 1
        assert re.search(BAD[kind], error), error
        assert store_state(store) == before


# ---- through the pipeline ---------------------------------------------------------------------------------------
def test_base_model_hf_rewires_the_recipe_and_builds_neither_tokenizer_nor_pretrain(tmp_path):
    from pipeline.config import compose_config
    from pipeline.dag import DAG, load_registry

    specs = load_registry("stages:REGISTRY")
    dag = DAG(specs)
    artifact = compose_config(specs, [])
    assert "import" not in dag.select(config=artifact) and "tokenizer" in dag.select(config=artifact)
    assert dag.specs["sft"].slots(artifact) == {"pretrain": "pretrain", "tokenizer": "tokenizer", "fetch": "fetch"}
    hf = compose_config(specs, ["base_model=hf", "base_model.path=/models/x"])
    chosen = dag.select(config=hf)
    assert "import" in chosen and not {"tokenizer", "pretrain"} & set(chosen)
    assert dag.specs["sft"].slots(hf) == {"pretrain": "import", "tokenizer": "import", "fetch": "fetch"}
    assert dag.specs["evaluate"].slots(hf)["pretrain"] == "import" and dag.specs["tokenize"].slots(hf)["tokenizer"] \
        == "import"  # fmt: skip
    assert dag.select(until=["sft"], config=hf) == ["fetch", "import", "sft"]
    continued = compose_config(specs, ["base_model=hf", "base_model.path=/models/x",
                                       "base_model.continue_pretraining=true"])  # fmt: skip
    assert dag.specs["pretrain"].slots(continued) == {"tokenizer": "import", "tokenize": "tokenize",
                                                      "base_model": "import"}  # fmt: skip
    assert dag.specs["sft"].slots(continued)["pretrain"] == "pretrain" and "tokenizer" not in dag.select(
        config=continued)  # fmt: skip


def test_import_commits_one_artifact_per_content_from_a_directory_or_an_object_store(tok_files, tmp_path, s3_store,
                                                                                     ray_session, capsys):  # fmt: skip
    import pyarrow.fs as pafs

    from gptline.cli.main import main
    from pipeline.artifacts import Store

    save_llama(tmp_path / "a", tok_files, 416, num_key_value_heads=2)
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # the same files elsewhere
    # Credentials in the URI: the import runs in a Ray worker started before this test set them in the environment.
    uri = s3_store.replace("s3://", "s3://gptline:gptline@").replace("/store?", "/models/llama?")
    bucket, root = pafs.FileSystem.from_uri(uri)
    pafs.copy_files(str(tmp_path / "a"), root, destination_filesystem=bucket)
    store = tmp_path / "store"
    common = [f"store.root={store}", "tracking=disabled", "run.quiet=true"]
    assert main(["import", str(tmp_path / "a"), *common]) == 0
    [artifact] = Store(str(store)).list("import")
    assert main(["import", str(tmp_path / "b"), *common]) == 0
    assert main(["import", uri, *common]) == 0
    assert [a.version for a in Store(str(store)).list("import")] == [artifact.version]
    out = capsys.readouterr().out
    assert out.count(f"imported {tmp_path / 'b'} as import/{artifact.version}") == 1
    assert len(re.findall(rf"^import +{artifact.version} +reuse$", out, re.MULTILINE)) == 2  # the plans of b and s3
    source = json.loads((Path(artifact.path) / "source.json").read_text())
    assert set(source["files"]) == {"config.json", "model.safetensors", "tokenizer.json"}


@pytest.fixture(scope="module")
def sft_from_import(tok, tmp_path_factory, ray_session) -> dict:
    """`gptline run base_model=hf ... --until sft` on the shared self-instruct tasks: fetch (nothing), import, sft."""
    from gptline.cli.main import main

    if not SHARED_SFT.exists():
        pytest.skip(f"needs {SHARED_SFT}")
    tmp = tmp_path_factory.mktemp("sft-from-import")
    save_llama(tmp / "hf", {"tokenizer.json": (tok / "tokenizer.json").read_bytes()}, 400, num_key_value_heads=2)
    records = [{"prompt": t["instruction"] + (f"\n\n{i['input']}" if i["input"] else ""), "response": i["output"]}
               for t in map(json.loads, SHARED_SFT.read_text().splitlines()) for i in t["instances"]]  # fmt: skip
    (tmp / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    store = tmp / "store"
    overrides = [f"store.root={store}", "tracking=disabled", "run.quiet=true", "fetch=none", "base_model=hf",
                 f"base_model.path={tmp / 'hf'}", f"sft.data=[{tmp / 'tasks.jsonl'}]", "sft.steps=2",
                 "sft.batch_size=4", "sft.eval_every=2", "sft.eval_batches=1", "sft.sample_every=2",
                 "sft.checkpoint_every=2", "sft.sample_tokens=4", "sft.optim.warmup_steps=1",
                 "cluster.resources.sft.num_workers=1"]  # fmt: skip
    assert main(["run", *overrides, "--until", "sft"]) == 0
    from pipeline.artifacts import Store

    [sft] = Store(str(store)).list("sft")
    [imported_model] = Store(str(store)).list("import")
    return {"sft": Path(sft.path), "import": Path(imported_model.path), "hf": tmp / "hf", "data": tmp / "tasks.jsonl"}


def test_sft_from_an_imported_model_runs_and_its_first_loss_is_transformers(sft_from_import, tmp_path):
    from transformers import LlamaForCausalLM

    from gptline.data.formats import EXAMPLES, load_ragged
    from gptline.training.loaders import collate_examples
    from pipeline.dag import StageResources
    from stages import sft

    paths = sft_from_import
    assert sorted(load_file(str(paths["sft"] / "model.safetensors"))) == sorted(
        load_file(str(paths["import"] / "model.safetensors")))  # fmt: skip
    assert json.loads((paths["sft"] / "manifest.json").read_text())["inputs"].keys() == {"import", "fetch"}
    examples = load_ragged(paths["sft"] / EXAMPLES, "train_ids", "train_trained")
    count = len(examples["train_ids"])
    # The run's sft config, for one step over every training example as one batch: the same batch whatever the
    # order the loader shuffles the examples into.
    config = json.loads((paths["sft"] / "manifest.json").read_text())["config"]
    cfg = typed(sft.SFTConfig, {**config, "steps": 1, "batch_size": count, "eval_every": 1, "sample_every": 1})
    out = tmp_path / "sft"
    out.mkdir()
    inputs = {"pretrain": paths["import"], "tokenizer": paths["import"], "fetch": paths["data"].parent}
    sft.run(cfg, inputs, out, StageContext("sft", resources=StageResources(num_workers=1), quiet=True))
    first = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])
    assert len(load_ragged(out / EXAMPLES, "train_ids")["train_ids"]) == count
    inputs_, targets = collate_examples(list(zip(examples["train_ids"], examples["train_trained"], strict=True)),
                                        ChatTemplate(paths["import"]).ids["pad"])  # fmt: skip
    reference = LlamaForCausalLM.from_pretrained(str(paths["hf"]), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = reference(torch.from_numpy(inputs_)).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.from_numpy(targets).flatten(),
                                             ignore_index=-100)  # fmt: skip
    assert first["loss"] == pytest.approx(float(loss), abs=1e-5)


def test_transformers_text_generation_pipeline_answers_as_gptline_chat(sft_from_import):
    from transformers import pipeline

    model_dir = sft_from_import["sft"]
    question = "Give me three words that rhyme with light."
    chat = subprocess.run([sys.executable, "-m", "gptline", "chat", str(model_dir), "--temperature", "0",
                           "--max-new-tokens", "24"], input=question + "\n", capture_output=True, text=True,
                          cwd=ROOT, timeout=300)  # fmt: skip
    assert chat.returncode == 0, chat.stderr
    ours = chat.stdout.split("model> ", 1)[1].removesuffix("\n")
    generator = pipeline("text-generation", model=str(model_dir), dtype=torch.float32)
    [result] = generator([{"role": "user", "content": question}], max_new_tokens=24, do_sample=False)
    theirs = result["generated_text"][-1]
    assert theirs["role"] == "assistant" and theirs["content"] == ours


def test_continued_pretraining_tokenizes_with_the_imported_tokenizer_and_starts_from_its_weights(tmp_path,
                                                                                                 ray_session):  # fmt: skip
    from gptline.data.formats import INDEX_SUFFIX, TOKENS_SUFFIX, read_ipc
    from pipeline.dag import StageResources
    from stages import pretrain, tokenize
    from tests.test_tokenizer import corpus, shakespeare_docs

    docs = shakespeare_docs()[:400]
    files = chatml_tokenizer(tmp_path, docs)
    save_llama(tmp_path / "hf", files, len(json.loads(files["tokenizer.json"])["model"]["vocab"]))
    base = imported(tmp_path / "hf", tmp_path / "import")
    source, shards = corpus(tmp_path, docs), tmp_path / "tokenize"
    shards.mkdir()
    tokenize.run(typed(tokenize.TokenizeConfig, {}), {"crawl_mix": source, "tokenizer": base}, shards,
                 StageContext("tokenize"))  # fmt: skip
    template = ChatTemplate(base)
    decoded = []
    for tokens_file in sorted((shards / "train").glob(f"*{TOKENS_SUFFIX}")):
        tokens = read_ipc(tokens_file).column("tokens").to_numpy()
        index = read_ipc(Path(str(tokens_file).replace(TOKENS_SUFFIX, INDEX_SUFFIX)))
        for start, length in zip(index.column("start").to_pylist(), index.column("length").to_pylist(), strict=True):
            assert tokens[start + length - 1] == template.ids["end_of_text"]
            decoded.append(template.tokenizer.decode(tokens[start : start + length - 1].tolist()))
    assert sorted(decoded) == sorted(docs)

    # pretrain.model names another shape: the imported model's is the one trained; a vanishing learning rate leaves
    # its weights where they started.
    cfg = typed(pretrain.PretrainConfig, {"model": {"dim": 32, "n_layers": 1, "n_heads": 2}, "seq_len": 64, "steps": 1,
                                          "batch_size": 4, "eval_every": 1, "eval_batches": 1, "sample_every": 1,
                                          "sample_tokens": 4, "optim": {"lr": 1e-12, "warmup_steps": 0,
                                                                         "weight_decay": 0.0}})  # fmt: skip
    out = tmp_path / "pretrain"
    out.mkdir()
    inputs = {"tokenizer": base, "tokenize": shards, "base_model": base}
    pretrain.run(cfg, inputs, out, StageContext("pretrain", resources=StageResources(num_workers=1), quiet=True))
    before, after = load(base).state_dict(), load(out).state_dict()
    assert before.keys() == after.keys()
    assert max((before[k] - after[k]).abs().max().item() for k in before) < 1e-8

"""Import a Llama-architecture Hugging Face model (a directory, or a prefix on any `pyarrow.fs` object store) as a
model directory in gptline's export layout, which every stage loads like a pretrain artifact.

`inspect(uri)` reads only small things (config.json, the safetensors headers, the tokenizer) and refuses every
difference from what gptline's model computes, each with a message naming the file and the field: another
architecture, rope scaling, biases, a head size other than hidden_size / num_attention_heads, another activation,
dropout, a pickle checkpoint (`pytorch_model.bin`: loading one runs code; the message says how to convert it), a
missing file, a truncated safetensors file, weights of the wrong shape, a tokenizer with more tokens than the
weights have embedding rows. `import_model(plan, out_dir)` then writes the directory:

- `model.safetensors`: the weights under the names the export uses (`export.weight_names`, read the other way by
  `load`), in their own dtype. Our special tokens that the tokenizer lacks take the next ids; their embedding (and
  `lm_head`) rows are the mean of the rows of the tokenizer's own tokens, the rows growing where needed;
- `config.json` (a `LlamaForCausalLM` config with gptline's own beside it) and `generation_config.json`;
- the tokenizer as it came: `tokenizer.json` with our tokens added, or the sentencepiece `tokenizer.model` with the
  added tokens listed in `tokenizer_meta.json` (special ids and strings, and the chat template: the model's own
  when it has one, else gptline's for the added role tokens); `tokenizer_config.json` carries the template too.

A model's own template must end an assistant turn with a special token (its end-of-turn, where generation stops).
`content_identity(uri)` is the sha256 of every file the import reads: the artifact's version, so two imports of the
same files are one artifact wherever they lie.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gptline.data.readers import filesystem
from gptline.data.tokenizer import GPTLINE_TOKENS, HF_TOKENIZER, META, SENTENCEPIECE
from gptline.model.export import WEIGHTS, generation_config, hf_config, weight_names
from gptline.model.gpt import GPT, ModelConfig
from pipeline.errors import GptlineError

ARCHITECTURE = "LlamaForCausalLM"
CONFIG = "config.json"
WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# Tokens every imported tokenizer ends up with; bos and unk stay the tokenizer's own (or none).
ENSURED = ("end_of_text", "pad", "system", "user", "assistant", "end_of_turn", "reward")
IGNORED_WEIGHTS = ("rotary_emb.inv_freq",)  # a buffer older checkpoints saved; recomputed from rope_theta
PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]


class Source:
    """The files of a model directory on a local or object-store filesystem."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.fs, self.root = filesystem(self.uri)

    def name(self, file: str) -> str:
        return f"{self.uri}/{file}"

    def exists(self, file: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(f"{self.root}/{file}").type == pafs.FileType.File

    def size(self, file: str) -> int:
        return self.fs.get_file_info(f"{self.root}/{file}").size

    def read(self, file: str, offset: int = 0, length: int | None = None) -> bytes:
        with self.fs.open_input_file(f"{self.root}/{file}") as f:
            f.seek(offset)
            return f.read(length)

    def local_path(self, file: str) -> str | None:
        """The file's path when it is on the local filesystem (read memory-mapped, not copied into memory)."""
        import pyarrow.fs as pafs

        return f"{self.root}/{file}" if isinstance(self.fs, pafs.LocalFileSystem) else None

    def json(self, file: str) -> Any:
        try:
            return json.loads(self.read(file))
        except ValueError as e:
            raise GptlineError(f"{self.name(file)}: not valid JSON: {e}") from e

    def sha256(self, file: str) -> str:
        from pipeline.artifacts import sha256_stream

        with self.fs.open_input_stream(f"{self.root}/{file}") as f:
            return sha256_stream(f)


@dataclass
class Tensor:
    file: str
    dtype: str
    shape: list[int]


@dataclass
class ImportPlan:
    """What `inspect` found: everything `import_model` needs, checked."""

    source: Source
    model: ModelConfig
    tensors: dict[str, Tensor]  # Hugging Face name -> where it is
    tokenizer_file: str
    tokenizer_config: dict[str, Any]
    tokens: dict[str, str | None]  # gptline's names -> the token strings, after adding
    added: list[str]  # our tokens the tokenizer lacked, in id order after its own
    own_vocab: int  # the tokenizer's size before adding
    chat_template: str | None  # the model's own
    files: list[str] = field(default_factory=list)  # every file the import reads


def _token_string(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _refuse(source: Source, file: str, problem: str) -> GptlineError:
    return GptlineError(f"{source.name(file)}: {problem}")


def model_config(source: Source, config: dict[str, Any]) -> ModelConfig:
    """gptline's ModelConfig for a Llama config.json; every setting our model cannot compute is refused."""
    architectures = config.get("architectures") or [config.get("model_type")]
    if architectures != [ARCHITECTURE] or config.get("model_type") != "llama":
        raise _refuse(source, CONFIG, f"architecture {architectures} (model_type {config.get('model_type')!r}) is not "
                                      f"supported: gptline imports {ARCHITECTURE} (model_type 'llama') only")  # fmt: skip
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or ({} if rope.get("rope_type", "default") == "default" else rope)
    if scaling:
        raise _refuse(source, CONFIG, f"rope scaling {scaling} is not supported (gptline's rotary embedding is "
                                      "plain RoPE with rope_theta)")  # fmt: skip
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise _refuse(source, CONFIG, f"{key}=true is not supported (gptline's model has no biases)")
    if config.get("hidden_act", "silu") != "silu":
        raise _refuse(source, CONFIG, f"hidden_act={config['hidden_act']!r} is not supported (SwiGLU: 'silu' only)")
    if config.get("attention_dropout", 0):
        raise _refuse(source, CONFIG, f"attention_dropout={config['attention_dropout']} is not supported "
                                      "(gptline's model has no dropout; set it to 0 to train without)")  # fmt: skip
    try:
        dim, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        cfg = ModelConfig(
            dim=dim,
            n_layers=int(config["num_hidden_layers"]),
            n_heads=heads,
            n_kv_heads=int(config.get("num_key_value_heads") or heads),
            vocab_size=int(config["vocab_size"]),
            hidden_dim=int(config["intermediate_size"]),
            max_seq_len=int(config["max_position_embeddings"]),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            init_std=float(config.get("initializer_range", 0.02)),
        )
    except KeyError as e:
        raise _refuse(source, CONFIG, f"missing {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise _refuse(source, CONFIG, f"a size is not a number: {e}") from None
    head_dim = config.get("head_dim")
    if head_dim is not None and int(head_dim) * heads != dim:
        raise _refuse(source, CONFIG, f"head_dim={head_dim} is not hidden_size / num_attention_heads = {dim}/{heads} "
                                      "(gptline's attention derives the head size from them)")  # fmt: skip
    problems = cfg.validate()
    if problems:
        raise _refuse(source, CONFIG, f"{problems[0][0]}: {problems[0][1]}")
    return cfg


def safetensors_header(source: Source, file: str) -> dict[str, Tensor]:
    """The tensors a safetensors file holds, from its header; the file must be as long as the header says."""
    size = source.size(file)
    if size < 8:
        raise _refuse(source, file, f"truncated safetensors file ({size} bytes)")
    (length,) = struct.unpack("<Q", source.read(file, 0, 8))
    if 8 + length > size:
        raise _refuse(source, file, f"truncated safetensors file: the header alone needs {8 + length} bytes of {size}")
    try:
        header = json.loads(source.read(file, 8, length))
    except ValueError as e:
        raise _refuse(source, file, f"not a safetensors file (its header is not JSON: {e})") from None
    header.pop("__metadata__", None)
    tensors, end = {}, 0
    for name, entry in header.items():
        if entry["dtype"] not in DTYPES:
            raise _refuse(source, file, f"{name} is {entry['dtype']}; gptline imports float32, float16 and bfloat16 "
                                        "weights (quantized checkpoints are not supported)")  # fmt: skip
        tensors[name] = Tensor(file, entry["dtype"], entry["shape"])
        end = max(end, entry["data_offsets"][1])
    if 8 + length + end != size:
        raise _refuse(source, file, f"truncated safetensors file: {size} bytes where its header describes "
                                    f"{8 + length + end}")  # fmt: skip
    return tensors


def weight_files(source: Source) -> list[str]:
    if source.exists(WEIGHTS):
        return [WEIGHTS]
    if source.exists(WEIGHTS_INDEX):
        index = source.json(WEIGHTS_INDEX)
        files = sorted(set(index.get("weight_map", {}).values()))
        for file in files:
            if not source.exists(file):
                raise _refuse(source, file, f"missing (listed in {WEIGHTS_INDEX})")
        return [WEIGHTS_INDEX, *files]
    pickle = next((p for p in PICKLES if source.exists(p)), None)
    if pickle:
        raise _refuse(source, pickle, "a pickle checkpoint; gptline reads safetensors only (loading a pickle runs "
                                      "the code inside it). If you trust the file, convert it once with transformers: "
                                      "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, "
                                      "safe_serialization=True), and import OUT")  # fmt: skip
    raise _refuse(source, WEIGHTS, f"missing (no {WEIGHTS} or {WEIGHTS_INDEX} in the model directory)")


def check_weights(source: Source, cfg: ModelConfig, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The tensors our model loads, each of the right shape; biases and unknown names are refused."""
    head = None if cfg.tie_embeddings else "lm_head.weight"
    expected = set(weight_names(cfg, head).values())
    with torch.device("meta"):
        shapes = {hf: list(p.shape) for hf, p in _hf_state(GPT(cfg)).items()}
    used = {}
    for name, tensor in sorted(tensors.items()):
        if name.endswith(IGNORED_WEIGHTS) or (name == "lm_head.weight" and cfg.tie_embeddings):
            continue  # a tied head saved anyway: transformers ignores it too
        if name.endswith(".bias"):
            raise _refuse(source, tensor.file, f"{name}: biases are not supported (gptline's model has none)")
        if name not in expected:
            raise _refuse(source, tensor.file, f"{name} is not a weight of a Llama model of this config")
        if tensor.shape != shapes[name]:
            raise _refuse(source, tensor.file, f"{name} has shape {tensor.shape}; {CONFIG} implies {shapes[name]}")
        used[name] = tensor
    missing = sorted(expected - set(used))
    if missing:
        raise _refuse(source, WEIGHTS, f"missing weights {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    return used


def _hf_state(model: GPT) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    names = weight_names(model.cfg, None if model.cfg.tie_embeddings else "lm_head.weight")
    return {hf: state[ours] for ours, hf in names.items()}


# ---- the tokenizer -----------------------------------------------------------------------------------------------
def _tokenizer_file(source: Source) -> str:
    for file in (HF_TOKENIZER, SENTENCEPIECE):
        if source.exists(file):
            return file
    raise _refuse(source, HF_TOKENIZER, f"missing (the model directory has no {HF_TOKENIZER} or {SENTENCEPIECE})")


def _own_tokens(source: Source, file: str, config: dict[str, Any], backend: Any) -> dict[str, str | None]:
    """The tokenizer's own bos, end-of-text, pad and unknown tokens (from tokenizer_config.json, else
    special_tokens_map.json, else a sentencepiece model's own ids)."""
    named = {**(source.json(SPECIAL_TOKENS_MAP) if source.exists(SPECIAL_TOKENS_MAP) else {}), **config}
    tokens = {ours: _token_string(named.get(f"{theirs}_token"))
              for ours, theirs in (("bos", "bos"), ("end_of_text", "eos"), ("pad", "pad"), ("unk", "unk"))}  # fmt: skip
    if file == SENTENCEPIECE:
        for ours, own_id in (("bos", backend.bos_id()), ("end_of_text", backend.eos_id()), ("pad", backend.pad_id()),
                             ("unk", backend.unk_id())):  # fmt: skip
            if tokens[ours] is None and own_id >= 0:
                tokens[ours] = backend.id_to_piece(own_id)
    return tokens


def _load_backend(source: Source, file: str, local: Path) -> tuple[Any, int]:
    """The tokenizer library's object, and its size."""
    (local / file).write_bytes(source.read(file))
    try:
        if file == HF_TOKENIZER:
            from tokenizers import Tokenizer

            backend = Tokenizer.from_file(str(local / file))
            return backend, backend.get_vocab_size(with_added_tokens=True)
        import sentencepiece as spm

        backend = spm.SentencePieceProcessor(model_file=str(local / file))
        return backend, backend.get_piece_size()
    except Exception as e:  # the libraries raise plain Exception subclasses for unreadable files
        raise _refuse(source, file, f"cannot be read as a tokenizer: {str(e).splitlines()[0]}") from None


def _token_id(backend: Any, file: str, token: str) -> int | None:
    if file == HF_TOKENIZER:
        return backend.token_to_id(token)
    found = backend.piece_to_id(token)
    return found if backend.id_to_piece(found) == token else None


def inspect(uri: str) -> ImportPlan:
    """Every check, reading only small files and headers; nothing is written anywhere but a temporary directory."""
    import tempfile

    source = Source(uri)
    if not source.exists(CONFIG):
        kind = "no such directory" if not _is_dir(source) else f"missing {CONFIG} (not a Hugging Face model directory)"
        raise GptlineError(f"base_model.path={uri}: {kind}")
    cfg = model_config(source, source.json(CONFIG))
    files = weight_files(source)
    tensors: dict[str, Tensor] = {}
    for file in files:
        if file != WEIGHTS_INDEX:
            tensors.update(safetensors_header(source, file))
    tensors = check_weights(source, cfg, tensors)
    rows = tensors["model.embed_tokens.weight"].shape[0]
    tokenizer_file = _tokenizer_file(source)
    tokenizer_config = source.json(TOKENIZER_CONFIG) if source.exists(TOKENIZER_CONFIG) else {}
    with tempfile.TemporaryDirectory() as tmp:
        backend, own_vocab = _load_backend(source, tokenizer_file, Path(tmp))
        if own_vocab > rows:
            raise _refuse(source, tokenizer_file, f"mismatched vocabulary sizes: the tokenizer has {own_vocab} tokens "
                                                  f"but the weights have {rows} embedding rows")  # fmt: skip
        tokens = _own_tokens(source, tokenizer_file, tokenizer_config, backend)
        chat_template = tokenizer_config.get("chat_template")
        if isinstance(chat_template, list):  # named templates: the default one
            chat_template = next((t["template"] for t in chat_template if t.get("name") == "default"), None)
        plan = ImportPlan(source, cfg, tensors, tokenizer_file, tokenizer_config, tokens, [], own_vocab, chat_template)
        _plan_tokens(plan, backend)
    plan.files = [CONFIG, *files, tokenizer_file] + [f for f in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP)
                                                     if source.exists(f)]  # fmt: skip
    return plan


def _is_dir(source: Source) -> bool:
    import pyarrow.fs as pafs

    return source.fs.get_file_info(source.root).type == pafs.FileType.Directory


def _plan_tokens(plan: ImportPlan, backend: Any) -> None:
    """Our tokens the tokenizer has under its own string or purpose are used; the others are added. The model's own
    template's end-of-turn token is the special token that follows an assistant answer in its rendering."""
    tokens = plan.tokens
    for name in ENSURED:
        if tokens.get(name) is None:
            tokens[name] = GPTLINE_TOKENS[name]
    if plan.chat_template is not None:
        tokens["end_of_turn"] = _template_end_of_turn(plan, backend)
    for name in ENSURED:
        if _token_id(backend, plan.tokenizer_file, tokens[name]) is None and tokens[name] not in plan.added:
            plan.added.append(tokens[name])


def _template_end_of_turn(plan: ImportPlan, backend: Any) -> str:
    from gptline.data.chat import jinja_environment

    context = {f"{name}_token": plan.tokens.get(name) for name in ("bos", "unk", "pad")}
    try:
        text = jinja_environment().from_string(plan.chat_template).render(messages=PROBE, add_generation_prompt=False,
                                                                           eos_token=plan.tokens["end_of_text"],
                                                                           **context)  # fmt: skip
    except Exception as e:  # a template error of any kind: Jinja's, or raise_exception's
        raise _refuse(plan.source, TOKENIZER_CONFIG, f"the chat_template cannot render a conversation: {e}") from None
    after = text[text.rfind(PROBE[-1]["content"]) + len(PROBE[-1]["content"]) :]
    specials = [t for t in _special_strings(plan, backend) if after.lstrip().startswith(t)]
    if not specials:
        raise _refuse(plan.source, TOKENIZER_CONFIG, "the chat_template ends an assistant turn with no special token "
                                                     f"({after[:20]!r} follows the answer); gptline needs one to stop "
                                                     "generation at")  # fmt: skip
    return max(specials, key=len)


def _special_strings(plan: ImportPlan, backend: Any) -> list[str]:
    if plan.tokenizer_file == HF_TOKENIZER:
        return [t.content for t in backend.get_added_tokens_decoder().values() if t.special]
    return [backend.id_to_piece(i) for i in range(backend.get_piece_size()) if backend.is_control(i)]


# ---- the import --------------------------------------------------------------------------------------------------
def content_identity(uri: str) -> dict[str, Any]:
    """What an import's output is a function of, besides the code: every file it reads, by sha256. Checks first."""
    plan = inspect(uri)
    return {"files": {file: plan.source.sha256(file) for file in plan.files}}


def import_model(plan: ImportPlan, out_dir: Path) -> dict[str, Any]:
    """Write the model directory (see the module's docstring); returns a summary for the manifest."""
    from safetensors.torch import load, load_file, save_file

    source, cfg = plan.source, plan.model
    ids, added = _write_tokenizer(plan, out_dir)
    vocab = max(cfg.vocab_size, max(ids[t] for t in plan.added) + 1) if plan.added else cfg.vocab_size
    weights: dict[str, torch.Tensor] = {}
    for file in sorted({t.file for t in plan.tensors.values()}):
        stored = load_file(source.local_path(file)) if source.local_path(file) else load(source.read(file))
        weights.update({name: tensor for name, tensor in stored.items() if name in plan.tensors})
    new_ids = torch.tensor(sorted(ids[t] for t in plan.added), dtype=torch.long)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in weights and len(new_ids):
            weights[name] = _with_rows(weights[name], vocab, new_ids, plan.own_vocab)
    dtype = {str(t.dtype).removeprefix("torch.") for t in weights.values()}
    save_file(weights, str(out_dir / WEIGHTS), metadata={"format": "pt"})
    model_cfg = dataclasses.replace(cfg, vocab_size=vocab)
    special_ids = {name: (None if token is None else ids[token]) for name, token in plan.tokens.items()}
    config = hf_config(model_cfg, special_ids, dtype=dtype.pop() if len(dtype) == 1 else "float32")
    (out_dir / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / GENERATION_CONFIG).write_text(json.dumps(generation_config(special_ids), indent=2) + "\n")
    _write_meta(plan, out_dir, vocab, special_ids, ids, added)
    return {"parameters": sum(t.numel() for t in weights.values()), "vocab_size": vocab,
            "added_tokens": len(plan.added), "own_chat_template": int(plan.chat_template is not None)}  # fmt: skip


def _with_rows(weight: torch.Tensor, rows: int, new_ids: torch.Tensor, own: int) -> torch.Tensor:
    """`weight` with `rows` rows, those of the new ids set to the mean of the tokenizer's own tokens' rows."""
    grown = torch.zeros(rows, weight.shape[1], dtype=weight.dtype)
    grown[: weight.shape[0]] = weight
    grown[new_ids] = weight[:own].float().mean(0).to(weight.dtype)
    return grown


def _write_tokenizer(plan: ImportPlan, out_dir: Path) -> tuple[dict[str, int], dict[str, int]]:
    """The tokenizer file with our tokens added; returns the id of every token named in `plan.tokens`, and the
    tokens added after a sentencepiece model's pieces (which its file cannot hold) with their ids."""
    file = plan.tokenizer_file
    backend, _ = _load_backend(plan.source, file, out_dir)  # which writes the file there as it came
    added: dict[str, int] = {}
    if file == HF_TOKENIZER:
        from tokenizers import AddedToken

        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in plan.added])
        backend.save(str(out_dir / file))
    else:
        added = {token: plan.own_vocab + i for i, token in enumerate(plan.added)}
    ids = {t: added.get(t, _token_id(backend, file, t)) for t in plan.tokens.values() if t is not None}
    return ids, added


def _write_meta(plan: ImportPlan, out_dir: Path, vocab: int, special_ids: dict, ids: dict[str, int],
                added: dict[str, int]) -> None:  # fmt: skip
    from gptline.data.chat import gptline_chat_template

    template = plan.chat_template or gptline_chat_template(plan.tokens)
    meta = {"vocab_size": vocab, "tokenizer_file": plan.tokenizer_file, "special_ids": special_ids,
            "special_tokens": plan.tokens, "chat_template": template, "added_tokens": added,
            "source": plan.source.uri}  # fmt: skip
    (out_dir / META).write_text(json.dumps(meta, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    config = dict(plan.tokenizer_config)
    config.pop("chat_template", None)
    decoder = dict(config.get("added_tokens_decoder") or {})
    for token in plan.added:  # how transformers learns of tokens a sentencepiece model lacks
        decoder[str(ids[token])] = {"content": token, "special": True, "normalized": False, "lstrip": False,
                                    "rstrip": False, "single_word": False}  # fmt: skip
    config.update(
        added_tokens_decoder=decoder,
        chat_template=template,
        **{f"{theirs}_token": plan.tokens[ours] for ours, theirs in (("end_of_text", "eos"), ("pad", "pad"))},
    )
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast" if plan.tokenizer_file == HF_TOKENIZER else
                      "LlamaTokenizer")  # fmt: skip
    (out_dir / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

"""Export to the Hugging Face format: safetensors weights, a `LlamaForCausalLM` config.json, tokenizer files.

`transformers` (and the serving tools built on it) load the directory directly; our module names are Llama's
without the `model.` prefix, so the export is a rename by one table (`weight_names`), which `load` and the Hugging
Face import read the other way. A `ScalarModel` (reward or value model) exports as `LlamaForSequenceClassification`
with one label: its `score` head, read by transformers at the last non-padding token, which is where our reward
token sits. `load(directory)` reads either back into our classes.

The tokenizer files are copied, and `tokenizer_config.json` gets the Jinja `chat_template` the model was trained
with (gptline's, or an imported model's own), so `apply_chat_template` and a server's chat endpoint give the ids
the stages trained on; `generation_config.json` names the end-of-turn token as an EOS, so generation stops where
the model learnt to stop.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gptline.model.gpt import GPT, Decoder, ModelConfig, ScalarModel

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "tokenizer_meta.json",
)
WEIGHTS = "model.safetensors"


LAYER_WEIGHTS = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


def weight_names(cfg: ModelConfig, head: str | None) -> dict[str, str]:
    """Our name -> the Hugging Face Llama name of every weight a model of this shape stores, with `head`
    ("lm_head.weight", "score.weight", or None for a language model whose head is its tied embedding)."""
    names = {"embed_tokens.weight": "model.embed_tokens.weight"}
    for layer in range(cfg.n_layers):
        names.update({f"layers.{layer}.{w}": f"model.layers.{layer}.{w}" for w in LAYER_WEIGHTS})
    names["norm.weight"] = "model.norm.weight"
    if head is not None:
        names[head] = head
    return names


def head_of(model: Decoder) -> str | None:
    if isinstance(model, ScalarModel):
        return "score.weight"
    return None if model.cfg.tie_embeddings else "lm_head.weight"


def hf_config(cfg: ModelConfig, special_ids: dict[str, int], scalar: bool = False, dtype: str = "float32") -> dict:
    return {
        "architectures": ["LlamaForSequenceClassification" if scalar else "LlamaForCausalLM"],
        **({"num_labels": 1} if scalar else {}),
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "bos_token_id": special_ids.get("bos", 1),
        "eos_token_id": special_ids.get("end_of_text", 2),
        "pad_token_id": special_ids.get("pad", 3),
        "torch_dtype": dtype,
        "gptline": asdict(cfg),  # our own config, so `load` rebuilds exactly this model
    }


def export(model: Decoder, out_dir: Path, tokenizer_dir: Path | None, special_ids: dict[str, int]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()  # a tied lm_head is not written: transformers ties it back to the embedding
    weights = {hf: state[ours].detach().to(torch.float32).contiguous() for ours, hf in weight_names(model.cfg,
               head_of(model)).items()}  # fmt: skip
    save_file(weights, str(out_dir / WEIGHTS), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(
        json.dumps(hf_config(model.cfg, special_ids, isinstance(model, ScalarModel)), indent=2) + "\n"
    )
    (out_dir / "generation_config.json").write_text(json.dumps(generation_config(special_ids), indent=2) + "\n")
    if tokenizer_dir is not None:
        export_tokenizer(tokenizer_dir, out_dir)


def generation_config(special_ids: dict[str, int | None]) -> dict:
    from gptline.data.chat import stop_ids

    eos = stop_ids(special_ids)
    return {"bos_token_id": special_ids.get("bos"), "eos_token_id": eos, "pad_token_id": special_ids.get("pad")}


def export_tokenizer(tokenizer_dir: Path, out_dir: Path) -> None:
    """The tokenizer files, with the chat template the stages use in `tokenizer_config.json`. Its special tokens
    are matched in the rendered text (`split_special_tokens: false`, transformers' default), which is how the role
    tokens the template writes become their ids."""
    from gptline.data.chat import ChatTemplate

    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out_dir / name)
    config_file = out_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    config.update(chat_template=ChatTemplate(tokenizer_dir).jinja, split_special_tokens=False)
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def load(directory: Path) -> Decoder:
    """The model an export holds: a GPT, or a ScalarModel for a sequence-classification export."""
    config = json.loads((directory / "config.json").read_text())
    scalar = config["architectures"] == ["LlamaForSequenceClassification"]
    model = (ScalarModel if scalar else GPT)(ModelConfig(**config["gptline"]))
    ours = {hf: name for name, hf in weight_names(model.cfg, head_of(model)).items()}
    stored = load_file(str(directory / WEIGHTS))
    unknown = sorted(set(stored) - set(ours))
    if unknown:
        raise ValueError(f"{directory / WEIGHTS}: weights {unknown[:3]} are not part of this model")
    state = {ours[name]: tensor for name, tensor in stored.items()}
    if isinstance(model, GPT) and model.cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state)
    return model

"""Export to the Hugging Face format: safetensors weights, a `LlamaForCausalLM` config.json, tokenizer files.

`transformers` (and the serving tools built on it) load the directory directly; our module names are Llama's
without the `model.` prefix, so the export is a rename. A `ScalarModel` (reward or value model) exports as
`LlamaForSequenceClassification` with one label: its `score` head, read by transformers at the last non-padding
token, which is where our reward token sits. `load(directory)` reads either back into our classes.
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


HEADS = ("lm_head.weight", "score.weight")


def hf_name(name: str) -> str:
    return name if name in HEADS else f"model.{name}"


def hf_config(cfg: ModelConfig, special_ids: dict[str, int], scalar: bool = False) -> dict:
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
        "torch_dtype": "float32",
        "gptline": asdict(cfg),  # our own config, so `load` rebuilds exactly this model
    }


def export(model: Decoder, out_dir: Path, tokenizer_dir: Path | None, special_ids: dict[str, int]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {hf_name(k): v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings and "lm_head.weight" in state:
        state.pop("lm_head.weight")  # shared with the embedding; transformers ties it back
    save_file(state, str(out_dir / WEIGHTS), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(
        json.dumps(hf_config(model.cfg, special_ids, isinstance(model, ScalarModel)), indent=2) + "\n"
    )
    generation = {"bos_token_id": special_ids.get("bos", 1), "eos_token_id": special_ids.get("end_of_text", 2),
                  "pad_token_id": special_ids.get("pad", 3)}  # fmt: skip
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    for name in TOKENIZER_FILES if tokenizer_dir is not None else ():
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out_dir / name)


def load(directory: Path) -> Decoder:
    """The model an export holds: a GPT, or a ScalarModel for a sequence-classification export."""
    config = json.loads((directory / "config.json").read_text())
    scalar = config["architectures"] == ["LlamaForSequenceClassification"]
    model = (ScalarModel if scalar else GPT)(ModelConfig(**config["gptline"]))
    state = {k.removeprefix("model."): v for k, v in load_file(str(directory / WEIGHTS)).items()}
    if isinstance(model, GPT) and model.cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state)
    return model

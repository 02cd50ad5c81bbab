"""The model against transformers' Llama on the same weights; the KV cache against full recomputation."""

from __future__ import annotations

import pytest
import torch

from gptline.model.export import export, load
from gptline.model.generate import SamplingConfig, generate
from gptline.model.gpt import GPT, ModelConfig
from pipeline.config import typed

SPECIAL = {"bos": 1, "end_of_text": 2, "pad": 3}


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(**{"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 101, "max_seq_len": 96,
                         "multiple_of": 32, **overrides})  # fmt: skip
    model = GPT(cfg).eval()
    with torch.no_grad():  # norms away from 1, so a wrong norm mapping could not hide
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_model(model: GPT, tmp_path):
    from transformers import LlamaForCausalLM

    export(model, tmp_path, None, SPECIAL)
    return LlamaForCausalLM.from_pretrained(str(tmp_path), torch_dtype=torch.float32).eval()


@pytest.mark.parametrize(
    "overrides", [{}, {"n_kv_heads": 2}, {"tie_embeddings": True}, {"n_kv_heads": 1, "rope_theta": 500000.0}]
)
def test_logits_match_transformers_llama(tmp_path, overrides):
    model = tiny(**overrides)
    reference = hf_model(model, tmp_path)
    tokens = torch.randint(0, 101, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(tokens)
        theirs = reference(tokens).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    assert model.num_params() == sum(p.numel() for p in reference.parameters())


def test_greedy_generation_matches_transformers_and_the_cache_matches_recomputation(tmp_path):
    model = tiny(n_kv_heads=2)
    reference = hf_model(model, tmp_path)
    prompt = [5, 17, 42, 8, 99, 23]
    greedy = SamplingConfig(max_new_tokens=30, temperature=0)
    [with_cache] = generate(model, [prompt], greedy, pad_id=3)
    [without_cache] = generate(model, [prompt], greedy, pad_id=3, use_cache=False)
    hf = reference.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, eos_token_id=None,
                            pad_token_id=3)[0, len(prompt):].tolist()  # fmt: skip
    assert with_cache == without_cache == hf


def test_left_padded_batch_generates_what_each_prompt_generates_alone():
    model = tiny()
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [20]]
    greedy = SamplingConfig(max_new_tokens=12, temperature=0)
    batched = generate(model, prompts, greedy, pad_id=3)
    assert batched == [generate(model, [p], greedy, pad_id=3)[0] for p in prompts]


def test_sampling_respects_stops_seed_top_k_and_top_p():
    model = tiny()
    cfg = SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=5, top_p=0.9)
    runs = [generate(model, [[1, 2, 3]] * 4, cfg, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert runs[0] == runs[1]  # a fixed generator reproduces
    first = generate(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=20, temperature=0))[0]
    stopped = generate(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=20, temperature=0), stop_ids=[first[4]])[0]
    assert stopped == first[: first.index(first[4]) + 1]
    with torch.no_grad():
        logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 10.0]])
    from gptline.model.generate import sample_next

    top1 = SamplingConfig(temperature=1.0, top_k=1)
    assert all(sample_next(logits, top1, None).item() == 4 for _ in range(20))
    nucleus = SamplingConfig(temperature=1.0, top_p=0.5)  # token 4 alone holds > 99% of the mass
    assert all(sample_next(logits, nucleus, None).item() == 4 for _ in range(20))


def test_inverse_cdf_sampling_draws_each_token_at_its_probability_and_never_a_masked_one():
    from gptline.model.generate import inverse_cdf_sample

    probs = torch.tensor([0.1, 0.0, 0.25, 0.6, 0.05, 0.0])  # zeros: entries top-k/top-p masked out
    draws = inverse_cdf_sample(probs.expand(40_000, -1), torch.Generator().manual_seed(0))
    frequencies = torch.bincount(draws, minlength=6).float() / len(draws)
    assert frequencies[1] == 0 and frequencies[5] == 0
    # binomial standard error at n=40000 is at most 0.0025; 4 sigma
    assert torch.allclose(frequencies, probs, atol=0.01), frequencies


def test_export_load_round_trip_and_config_errors(tmp_path):
    model = tiny(n_kv_heads=2, tie_embeddings=True)
    export(model, tmp_path, None, SPECIAL)
    again = load(tmp_path)
    tokens = torch.randint(0, 101, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(tokens)[0], again(tokens)[0])
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len=96"):
        model(torch.zeros(1, 97, dtype=torch.long))
    from pipeline.config import validate
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="'model.n_kv_heads': must divide n_heads=4"):
        validate(typed(ModelConfig, {"n_heads": 4, "n_kv_heads": 3}), "model.")


@pytest.mark.parametrize(
    ("preset", "billions"), [("llama-7b", 6.7), ("llama-13b", 13.0), ("llama-33b", 32.5), ("llama-65b", 65.2)]
)
def test_llama_presets_have_the_papers_sizes(preset, billions):
    import yaml

    from pipeline.config import DEFAULT_CONFIG_DIR

    values = yaml.safe_load((DEFAULT_CONFIG_DIR / "pretrain" / "model" / f"{preset}.yaml").read_text())
    cfg = ModelConfig(**values, vocab_size=32000)
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_params() / 1e9 == pytest.approx(billions, abs=0.1)  # 65B: 65.29e9, as in the released weights
    if preset == "llama-65b":
        assert (cfg.n_layers, cfg.n_heads, cfg.dim, cfg.max_seq_len) == (80, 64, 8192, 2048)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    from stages.pretrain import checkpoint_blocks

    plain, wrapped = tiny(), tiny()
    checkpoint_blocks(wrapped)
    tokens = torch.randint(0, 101, (2, 33), generator=torch.Generator().manual_seed(3))
    losses = []
    for model in (plain, wrapped):
        model.train()
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    for (name, a), (_, b) in zip(plain.named_parameters(), wrapped.named_parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_bf16_parameters_beside_fp32_rotary_tables_run_every_path_in_bf16():
    """DeepSpeed's bf16 engine (`precision: bf16`, and `auto` on a GPU) casts the parameters only and keeps fp32
    buffers, the rotary tables among them: training, packed rows and cached decoding all run, in bf16, close to
    fp32."""
    model = tiny()
    tokens = torch.randint(0, 101, (2, 33), generator=torch.Generator().manual_seed(3))
    segments = torch.tensor([[0] * 12 + [1] * 20, [0] * 32])
    with torch.no_grad():
        _, fp32_loss = model(tokens[:, :-1], tokens[:, 1:])
        _, fp32_packed = model(tokens[:, :-1], tokens[:, 1:], segments=segments)
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
        assert model.rope_cos.dtype == torch.float32
        logits, bf16_loss = model(tokens[:, :-1], tokens[:, 1:])
        _, bf16_packed = model(tokens[:, :-1], tokens[:, 1:], segments=segments)
    assert logits.dtype == torch.bfloat16
    assert float(bf16_loss) == pytest.approx(float(fp32_loss), rel=2e-2)
    assert float(bf16_packed) == pytest.approx(float(fp32_packed), rel=2e-2)
    answers = generate(model, [[5, 6, 7], [8, 9]], SamplingConfig(max_new_tokens=6, temperature=0.0), [], pad_id=0)
    assert [len(a) for a in answers] == [6, 6]

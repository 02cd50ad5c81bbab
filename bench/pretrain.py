"""Benchmark a training step: our model vs transformers' LlamaForCausalLM, and our MFU, side by side in one process.

    python -m bench.pretrain [--dim 192] [--layers 4] [--heads 4] [--vocab 4096] [--seq 256] [--batch 8] [--steps 10]
                             [--threads 2] [--no-compile]

Both models hold the same weights (ours exported and loaded by transformers), train on the same random batch with
the same fused AdamW (what the stage's engine and transformers' Trainer use), fp32, step by step in turn; a ratio is
the median of the rounds' own ratios (each round runs every variant once, back to back: this machine's speed
drifts). Four ways: ours as the stage trains it with `pretrain.compile=true` (every block through `torch.compile`,
gptline/training/engine.py: compile_blocks), ours eager, transformers eager (how its Trainer runs by default), and
transformers with the same per-block compile, so the ratio shows where the difference comes from. The default
shape is the `tiny` preset with the default tokenizer's 4096 pieces (what `make run` pretrains); `--dim 512 --heads
8` is a shape where matmuls dominate. MFU is our training FLOP/s (6N plus the attention term per token) over the
machine's fp32 matmul peak measured here with the same thread count.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gptline.model.export import export
from gptline.model.gpt import GPT, ModelConfig
from gptline.training.engine import compile_blocks, flops_per_token, measured_peak_flops


def step_time(model, forward, optimizer, tokens: torch.Tensor) -> float:
    start = time.perf_counter()
    loss = forward(model, tokens)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()

    from transformers import LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, vocab_size=args.vocab,
                      max_seq_len=args.seq, multiple_of=64)  # fmt: skip
    ours = GPT(cfg)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(1))

    def ours_loss(model, t):
        return model(t[:, :-1], t[:, 1:])[1]

    def theirs_loss(model, t):
        return model(input_ids=t[:, :-1], labels=t[:, :-1].clone()).loss  # transformers shifts labels itself

    variants = [("ours", False), ("transformers", False)]
    if args.compile:
        variants = [("ours", True), *variants, ("transformers", True)]
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        export(ours, Path(tmp), None, {})  # once; every transformers copy loads it
        for kind, compiled in variants:
            if kind == "ours":
                model, forward = GPT(cfg), ours_loss
                model.load_state_dict(ours.state_dict())
            else:
                model = LlamaForCausalLM.from_pretrained(tmp, torch_dtype=torch.float32, attn_implementation="sdpa")
                forward = theirs_loss
            if compiled:
                compile_blocks(model if kind == "ours" else model.model)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            runs[f"{kind} ({'compiled' if compiled else 'eager'})"] = (model.train(), forward, optimizer)
    for model, forward, optimizer in runs.values():  # warm-up (and compile)
        for _ in range(2):
            step_time(model, forward, optimizer, tokens)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.steps):
        for name, (model, forward, optimizer) in runs.items():
            times[name].append(step_time(model, forward, optimizer, tokens))
    peak = measured_peak_flops()
    tokens_per_step = args.batch * args.seq
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"model: dim {args.dim}, {args.layers} layers, {args.heads} heads, vocab {args.vocab}, "
          f"{ours.num_params() / 1e6:.1f} M parameters; batch {args.batch} x {args.seq}; fp32; {args.threads} threads")  # fmt: skip
    for name in runs:
        print(
            f"  {name:<24} {tokens_per_step / median[name]:8.0f} tokens/s  ({median[name] * 1000:.0f} ms/step, median of {args.steps})"
        )

    def ratio(slow: str, fast: str) -> float:
        return statistics.median(a / b for a, b in zip(times[slow], times[fast], strict=True))

    ours_name = "ours (compiled)" if args.compile else "ours (eager)"
    print(f"ratio {ours_name} / transformers (eager): {ratio('transformers (eager)', ours_name):.2f}x "
          "(target >= 1.2x)")  # fmt: skip
    if args.compile:
        print(f"ratio ours (compiled) / transformers (compiled): "
              f"{ratio('transformers (compiled)', 'ours (compiled)'):.2f}x")  # fmt: skip
        print(f"ratio ours (eager) / transformers (eager): {ratio('transformers (eager)', 'ours (eager)'):.2f}x")
    achieved = tokens_per_step * flops_per_token(ours, args.seq) / median[ours_name]
    print(f"MFU ({ours_name}): {achieved / 1e9:.1f} GFLOP/s of a measured fp32 matmul peak of {peak / 1e9:.1f} "
          f"GFLOP/s = {achieved / peak:.0%} (target >= 50%)")  # fmt: skip


if __name__ == "__main__":
    main()

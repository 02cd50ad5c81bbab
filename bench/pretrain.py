"""Benchmark a training step: our model vs transformers' LlamaForCausalLM, and our MFU, side by side in one process.

    python -m bench.pretrain [--dim 512] [--layers 4] [--seq 256] [--batch 8] [--steps 10] [--threads 2]

Both models hold the same weights (ours exported and loaded by transformers), train on the same random batch with
the same AdamW, fp32, alternating step by step; the medians are compared. MFU is our training FLOP/s (6N plus the
attention term per token) over the machine's fp32 matmul peak measured here with the same thread count.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from stages.model.export import export
from stages.model.gpt import GPT, ModelConfig
from stages.training.engine import flops_per_token, measured_peak_flops


def step_time(model, forward, optimizer, tokens: torch.Tensor) -> float:
    start = time.perf_counter()
    loss = forward(model, tokens)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from transformers import LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, vocab_size=args.vocab,
                      max_seq_len=args.seq, multiple_of=64)  # fmt: skip
    ours = GPT(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        export(ours, Path(tmp), None, {})
        theirs = LlamaForCausalLM.from_pretrained(tmp, torch_dtype=torch.float32, attn_implementation="sdpa")
    ours.train()
    theirs.train()
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(1))

    def ours_loss(model, t):
        return model(t[:, :-1], t[:, 1:])[1]

    def theirs_loss(model, t):
        return model(input_ids=t[:, :-1], labels=t[:, :-1].clone()).loss  # transformers shifts labels itself

    runs = {
        "ours": (ours, ours_loss, torch.optim.AdamW(ours.parameters(), lr=1e-4)),
        "transformers": (theirs, theirs_loss, torch.optim.AdamW(theirs.parameters(), lr=1e-4)),
    }
    for model, forward, optimizer in runs.values():  # warm-up
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
            f"  {name:<13} {tokens_per_step / median[name]:8.0f} tokens/s  ({median[name] * 1000:.0f} ms/step, median of {args.steps})"
        )
    print(f"ratio ours / transformers: {median['transformers'] / median['ours']:.2f}x (target >= 1.2x)")
    achieved = tokens_per_step * flops_per_token(ours, args.seq) / median["ours"]
    print(f"MFU: {achieved / 1e9:.1f} GFLOP/s of a measured fp32 matmul peak of {peak / 1e9:.1f} GFLOP/s = "
          f"{achieved / peak:.0%} (target >= 50%)")  # fmt: skip


if __name__ == "__main__":
    main()

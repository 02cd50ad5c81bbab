"""The TRL side of `python -m bench.grpo`: run in the separate virtualenv that has TRL (`make bench-venv`), on the
model `bench.grpo` exported, with the same prompts, group size, minibatch, answer length, KL coefficient and reward.

    .venv-trl/bin/python -P bench/grpo_trl.py SFT_DIR PROMPTS_JSON ARGS_JSON

One GRPO iteration is one generation of `batch x group` answers and the optimizer steps over it
(`steps_per_generation` of `minibatch` answers each). Lockstep with the parent: each iteration starts when a line
arrives on stdin and its seconds are printed as one JSON line when it ends, so the parent's own iterations run in
between on the same machine state.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer


def e_fraction(completions, **kwargs) -> list[float]:
    """The bench's reward on both sides: the share of an answer's characters that are the letter e."""
    return [10 * c.count("e") / max(1, len(c)) for c in completions]


class Lockstep(TrainerCallback):
    """Holds each iteration (`steps` optimizer steps) until the parent says go, and reports how long it took."""

    def __init__(self, steps: int) -> None:
        self.steps, self.start = steps, 0.0

    def wait(self) -> None:
        sys.stdin.readline()
        self.start = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.wait()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.steps == 0:
            print(json.dumps({"iteration_s": time.perf_counter() - self.start}), flush=True)
            self.wait()


def main() -> None:
    sft, prompts, args = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    torch.set_num_threads(args["threads"])
    tokenizer = AutoTokenizer.from_pretrained(sft)
    steps = args["batch"] * args["group"] // args["minibatch"]
    # Each prompt appears once per iteration: TRL repeats it `num_generations` times itself.
    dataset = Dataset.from_dict({"prompt": prompts * (args["iterations"] + 2)})
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out,
            per_device_train_batch_size=args["minibatch"],
            gradient_accumulation_steps=1,
            steps_per_generation=steps,
            num_generations=args["group"],
            num_iterations=1,
            max_completion_length=args["new_tokens"],
            temperature=1.0,
            beta=args["kl_coef"],
            epsilon=0.2,
            loss_type="bnpo",  # the mean over the minibatch's answer tokens, as ours with aggregation=token
            scale_rewards="group",
            learning_rate=1e-5,
            max_steps=steps * (args["iterations"] + 1),
            shuffle_dataset=False,
            report_to=[],
            save_strategy="no",
            logging_steps=1000,
            use_cpu=True,
            bf16=False,
            seed=0,
        )
        trainer = GRPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(sft),
            reward_funcs=e_fraction,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[Lockstep(steps)],
        )
        trainer.train()


if __name__ == "__main__":
    main()

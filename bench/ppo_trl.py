"""The TRL side of `python -m bench.ppo`: run in the separate virtualenv that has TRL 1.12.0 (its last release with
`PPOTrainer`), on the models `bench.ppo` exported, with the same batch, minibatch, epochs and answer length.

    .venv-trl/bin/python bench/ppo_trl.py SFT_DIR RM_DIR PROMPTS_JSON ARGS_JSON

Lockstep with the parent: each PPO update (rollout + scoring + epochs) starts when a line arrives on stdin, and its
seconds are printed as one JSON line when it ends, so the parent runs its own iterations in between and the two are
measured side by side on the same machine state (this machine's speed drifts by 10-20% over minutes).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
from trl.experimental.ppo import PPOConfig, PPOTrainer


class Lockstep(TrainerCallback):
    """Holds each update until the parent says go, and reports how long it took."""

    def __init__(self) -> None:
        self.start = 0.0

    def wait(self) -> None:
        sys.stdin.readline()
        self.start = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.wait()

    def on_step_end(self, args, state, control, **kwargs):
        print(json.dumps({"iteration_s": time.perf_counter() - self.start}), flush=True)
        self.wait()


def main() -> None:
    sft, rm, prompts, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
    torch.set_num_threads(args["threads"])
    tokenizer = AutoTokenizer.from_pretrained(sft)
    dataset = Dataset.from_dict({"input_ids": prompts})
    with tempfile.TemporaryDirectory() as out:
        config = PPOConfig(
            output_dir=out,
            # TRL 1.12: rollout batch = per_device_train_batch_size x accumulation; minibatch = that / num_mini_batches
            per_device_train_batch_size=args["batch"],
            gradient_accumulation_steps=1,
            num_mini_batches=args["batch"] // args["minibatch"],
            num_ppo_epochs=2,
            total_episodes=args["batch"] * (args["iterations"] + 1),
            response_length=args["new_tokens"],
            temperature=1.0,
            local_rollout_forward_batch_size=args["batch"],
            num_sample_generations=0,
            report_to=[],
            save_strategy="no",
            logging_steps=1000,
            use_cpu=True,
            bf16=False,
            dataloader_drop_last=True,
        )
        trainer = PPOTrainer(
            args=config,
            processing_class=tokenizer,
            model=AutoModelForCausalLM.from_pretrained(sft),
            ref_model=AutoModelForCausalLM.from_pretrained(sft),
            reward_model=AutoModelForSequenceClassification.from_pretrained(rm),
            value_model=AutoModelForSequenceClassification.from_pretrained(rm),
            train_dataset=dataset,
            callbacks=[Lockstep()],
        )
        trainer.train()


if __name__ == "__main__":
    main()

"""`gptline chat ARTIFACT` and `gptline sample ARTIFACT PROMPT`: talk to a model in the terminal.

`chat` reads user turns from standard input (a terminal or a pipe), keeps the conversation as messages and renders
it with the chat template every turn (the one sft, rm and ppo use), dropping the oldest turns when the prompt and
the answer would not fit the model's context. An answer ends at the end-of-turn token or at end-of-text (the EOS
tokens of the export's generation_config.json, where servers stop too). On a terminal the answer is streamed as it
is sampled: the answer so far is decoded after each token and only the new text is printed, so multi-byte
characters never print half. When standard output is not a terminal (a pipe, a file), each answer is printed whole
once complete, exactly as decoded: a stream cannot take back text that a later byte token turns into replacement
characters. EOF or Ctrl-C ends the session cleanly. `sample` continues a plain-text prompt with a base (pretrained)
model until end-of-text, printed the same way.
Sampling flags: temperature, top-k, top-p, max new tokens, and a seed (one generator for the session, so the same
seed and the same input give the same conversation).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable

import torch

from gptline.data.chat import ChatTemplate, Message, stop_ids
from gptline.model.export import load
from gptline.model.generate import SamplingConfig, generate


def add_sampling_arguments(parser) -> None:
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)


def add_chat_arguments(parser) -> None:
    add_sampling_arguments(parser)
    parser.add_argument("--system", default=None, help="a system message opening the conversation")


def add_sample_arguments(parser) -> None:
    parser.add_argument("prompt")
    add_sampling_arguments(parser)


def _sampling(args) -> SamplingConfig:
    from pipeline.errors import ConfigError

    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p)  # fmt: skip
    problems = cfg.validate()
    if problems:
        key, problem = problems[0]
        raise ConfigError(f"--{key.replace('_', '-')} {problem}")
    return cfg


def stream(decode: Callable[[list[int]], str], out=sys.stdout) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """A generate() step callback printing the new text of row 0 as it grows."""
    tokens: list[int] = []
    shown = [""]

    def on_step(token: torch.Tensor, _logits: torch.Tensor) -> None:
        tokens.append(int(token[0]))
        text = decode(tokens)
        if text.startswith(shown[0]) and len(text) > len(shown[0]):
            out.write(text[len(shown[0]) :])
            out.flush()
            shown[0] = text

    return on_step


def fit_history(template: ChatTemplate, messages: list[Message], room: int) -> list[Message]:
    """The newest turns whose prompt fits in `room` tokens (a system message, if any, is kept)."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    while turns and len(template.prompt(system + turns)) > room:
        turns = turns[2:] if len(turns) > 1 else []  # drop the oldest user turn and its answer
    return system + turns


def run_chat(args) -> int:
    model, template = load(args.path).eval(), ChatTemplate(args.path)
    sampling = _sampling(args)
    room = model.cfg.max_seq_len - sampling.max_new_tokens
    generator = torch.Generator().manual_seed(args.seed)
    messages: list[Message] = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    live = sys.stdout.isatty()
    try:
        while True:
            if interactive:
                print("you> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line:
                break
            if not line.strip():
                continue
            messages = fit_history(template, [*messages, {"role": "user", "content": line.strip()}], room)
            if not messages or messages[-1]["role"] != "user":
                print("(that message alone is longer than the model's context)", flush=True)
                messages = []
                continue
            print("model> ", end="", flush=True)
            [answer] = generate(model, [template.prompt(messages)], sampling, stop_ids=stop_ids(template.ids),
                                pad_id=template.ids["pad"], generator=generator,
                                on_step=stream(template.decode) if live else None)  # fmt: skip
            text = template.decode(answer)
            print("" if live else text, flush=True)
            messages.append({"role": "assistant", "content": text})
    except KeyboardInterrupt:
        print(flush=True)
    return 0


def run_sample(args) -> int:
    model, template = load(args.path).eval(), ChatTemplate(args.path)
    sampling = _sampling(args)
    prompt = [template.ids["bos"], *template.tokenizer.encode(args.prompt)][
        -(model.cfg.max_seq_len - sampling.max_new_tokens) :
    ]
    print(args.prompt, end="", flush=True)
    end = template.ids["end_of_text"]
    live = sys.stdout.isatty()

    def decode(ids: list[int]) -> str:
        return template.tokenizer.decode([i for i in ids if i != end])

    continuation: list[list[int]] = [[]]
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends the sample, not with a traceback
        continuation = generate(model, [prompt], sampling, stop_ids=[end], pad_id=template.ids["pad"],
                                generator=torch.Generator().manual_seed(args.seed),
                                on_step=stream(decode) if live else None)  # fmt: skip
    print("" if live else decode(continuation[0]), flush=True)
    return 0

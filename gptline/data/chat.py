"""Conversations and comparisons: the JSONL formats sft and rm read, and the one chat template that sft, rm, ppo
and `gptline chat` share.

Conversation records (sft): `{"prompt", "response"}` (optionally `"system"`) or `{"messages": [{"role",
"content"}, ...]}` with roles system (first only), user and assistant, multi-turn. Comparison records (rm):
`{"prompt", "chosen", "rejected"}`; K-way rankings `{"prompt", "completions": [...], "ranking": [...]}` where
`ranking` lists completion indices best first, expanded into all C(K,2) (better, worse) pairs, each weighted
1/C(K,2) so a prompt counts once however many completions it has (InstructGPT); and Anthropic HH transcripts
`{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}`, whose shared turns are the prompt and whose
last assistant turns are the two responses. A `prompt` is a string (one user turn) or a list of messages. A bad
record is skipped and counted by reason, and the first line of each reason is kept, so a report can name it.

The template: `<s>` then, per message, its role token, the content's pieces, `<|end|>`. Content is encoded as
text, so role tokens typed by a user are just characters, never control tokens. The generation prompt ends with
`<|assistant|>`; a model answers and closes its turn with `<|end|>`. For the reward model the `<|reward|>` token
follows the last turn and the scalar is read there. `encode` marks which tokens the model is trained to produce:
every assistant turn's content and its `<|end|>`, nothing of system or user turns.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from gptline.data.readers import capped_lines, expand_paths, filesystem

ROLES = ("system", "user", "assistant")
Message = dict[str, str]


@dataclass
class Skipped:
    """Bad records by reason, with the first place each reason was seen."""

    counts: Counter = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        self.first.setdefault(reason, where)

    def summary(self) -> dict[str, Any]:
        return {reason: {"count": n, "first": self.first[reason]} for reason, n in sorted(self.counts.items())}


class BadRecord(ValueError):
    """A record that cannot be used; the message is the reason it is counted under."""


def jsonl_records(
    patterns: list[str], key: str, skipped: Skipped, max_line_bytes: int
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(file:line, object) for every JSON object line of the matched files (plain or compressed). A line longer than
    `max_line_bytes` is skipped as oversized_line, never held whole in memory (a small gzip can expand to gigabytes
    on one line)."""
    for path in expand_paths(patterns, [".jsonl", ".jsonl.gz", ".json"], key):
        fs, inner = filesystem(path)
        number = 0
        try:
            with fs.open_input_stream(inner, compression="detect") as stream:
                for number, raw in enumerate(capped_lines(io.BufferedReader(stream), max_line_bytes), 1):
                    where = f"{path}:{number}"
                    if raw is None:
                        skipped.add("oversized_line", where)
                        continue
                    line = raw.decode("utf-8", errors="replace")
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except ValueError:
                        skipped.add("invalid_json", where)
                        continue
                    if isinstance(record, dict):
                        yield where, record
                    else:
                        skipped.add("not_an_object", where)
        except (OSError, EOFError, zlib.error):  # corrupt or truncated compression: the lines read so far stand
            skipped.add("unreadable_rest_of_file", f"{path}:{number + 1}")


# ---- conversations -----------------------------------------------------------------------------------------------
def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise BadRecord(f"missing_{name}" if value is None else f"non_string_{name}")
    if not value.strip():
        raise BadRecord(f"empty_{name}")
    return value


def prompt_messages(prompt: Any, system: Any = None) -> list[Message]:
    """A prompt given as a string (one user turn) or as a list of messages ending in a user turn."""
    if isinstance(prompt, list):
        messages = [_message(m) for m in prompt]
        if not messages or messages[-1]["role"] != "user":
            raise BadRecord("prompt_not_ending_in_user_turn")
    else:
        messages = [{"role": "user", "content": _text(prompt, "prompt")}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": _text(system, "system")})
    _check_order(messages)
    return messages


def _message(raw: Any) -> Message:
    if not isinstance(raw, dict) or raw.get("role") not in ROLES:
        raise BadRecord("bad_role")
    return {"role": raw["role"], "content": _text(raw.get("content"), "content")}


def _check_order(messages: list[Message]) -> None:
    if any(m["role"] == "system" for m in messages[1:]):
        raise BadRecord("system_not_first")


def conversation(record: dict[str, Any]) -> list[Message]:
    """The messages of a conversation record; at least one assistant turn."""
    if "messages" in record:
        if not isinstance(record["messages"], list):
            raise BadRecord("bad_messages")
        messages = [_message(m) for m in record["messages"]]
        _check_order(messages)
    else:
        messages = prompt_messages(record.get("prompt"), record.get("system"))
        messages.append({"role": "assistant", "content": _text(record.get("response"), "response")})
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no_assistant_turn")
    return messages


def read_conversations(patterns: list[str], key: str, skipped: Skipped, max_line_bytes: int) -> list[list[Message]]:
    found = []
    for where, record in jsonl_records(patterns, key, skipped, max_line_bytes):
        try:
            found.append(conversation(record))
        except BadRecord as bad:
            skipped.add(str(bad), where)
    return found


def read_prompts(patterns: list[str], key: str, skipped: Skipped, max_line_bytes: int) -> list[list[Message]]:
    """Prompt records, `{"prompt": str}` or `{"messages": [...]}` ending in a user turn (ppo's rollouts)."""
    found = []
    for where, record in jsonl_records(patterns, key, skipped, max_line_bytes):
        try:
            found.append(prompt_messages(record.get("messages", record.get("prompt")), record.get("system")))
        except BadRecord as bad:
            skipped.add(str(bad), where)
    return found


# ---- comparisons -------------------------------------------------------------------------------------------------
@dataclass
class Comparison:
    prompt: list[Message]
    chosen: str
    rejected: str
    weight: float = 1.0
    source: str = ""  # file:line of the record it came from


HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def hh_turns(transcript: str) -> list[Message]:
    """`"\\n\\nHuman: ...\\n\\nAssistant: ..."` as messages."""
    parts = HH_TURN.split(transcript)
    if len(parts) < 3 or parts[0].strip():
        raise BadRecord("not_an_hh_transcript")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2], strict=True)]


def comparisons(record: dict[str, Any]) -> list[Comparison]:
    if "completions" in record or "ranking" in record:
        completions, ranking = record.get("completions"), record.get("ranking")
        if not isinstance(completions, list) or len(completions) < 2:
            raise BadRecord("fewer_than_two_completions")
        texts = [_text(c, "completion") for c in completions]
        if not isinstance(ranking, list) or sorted(ranking) != list(range(len(texts))):
            raise BadRecord("ranking_not_a_permutation")
        prompt = prompt_messages(record.get("prompt"), record.get("system"))
        pairs = list(combinations(ranking, 2))  # ranking is best first: each pair is (better, worse)
        return [Comparison(prompt, texts[a], texts[b], 1.0 / len(pairs)) for a, b in pairs]
    if "prompt" not in record and isinstance(record.get("chosen"), str) and HH_TURN.match(record["chosen"]):
        chosen, rejected = hh_turns(record["chosen"]), hh_turns(_text(record.get("rejected"), "rejected"))
        if chosen[:-1] != rejected[:-1] or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            raise BadRecord("hh_transcripts_differ_before_the_last_answer")
        if not chosen[-1]["content"] or not rejected[-1]["content"]:
            raise BadRecord("empty_response")
        if len(chosen) < 2:
            raise BadRecord("no_prompt")
        return [Comparison(chosen[:-1], chosen[-1]["content"], rejected[-1]["content"])]
    prompt = prompt_messages(record.get("prompt"), record.get("system"))
    chosen, rejected = _text(record.get("chosen"), "chosen"), _text(record.get("rejected"), "rejected")
    return [Comparison(prompt, chosen, rejected)]


def read_comparisons(patterns: list[str], key: str, skipped: Skipped, max_line_bytes: int) -> list[Comparison]:
    found: list[Comparison] = []
    for where, record in jsonl_records(patterns, key, skipped, max_line_bytes):
        try:
            found += [dataclasses.replace(c, source=where) for c in comparisons(record)]
        except BadRecord as bad:
            skipped.add(str(bad), where)
    return found


# The held-out split's hash salt, one for rm and dpo: at the same seed and fraction both hold out the same prompts
# (those evaluate asks the models, which then no training stage saw).
COMPARISON_SPLIT = "comparison-split"


def split_comparisons(found: list[Comparison], encode: Callable[[int, Comparison], Any], seed: int,
                      fraction: float, what: str, skipped: Skipped) -> dict[str, list[Any]]:  # fmt: skip
    """The comparisons encoded by `encode(number, comparison)` (None: skipped, the reason added to `skipped`) and
    split into "train" and "validation" by a hash of the prompt, so every pair of one prompt (a ranking's, or the
    pairs of one multiple-choice question written one per line) stays on one side, and the split never depends on
    order. `what` names the data in the error when a side is empty."""
    from gptline.data.dedup import unit_hash
    from pipeline.errors import GptlineError

    kept, keys = [], []
    for number, c in enumerate(found):
        item = encode(number, c)
        if item is not None:
            kept.append(item)
            keys.append(json.dumps(c.prompt, sort_keys=True))
    held_out = unit_hash(seed, COMPARISON_SPLIT, keys) < fraction
    splits = {"train": [k for k, h in zip(kept, held_out, strict=True) if not h],
              "validation": [k for k, h in zip(kept, held_out, strict=True) if h]}  # fmt: skip
    if not splits["train"] or not splits["validation"]:
        raise GptlineError(f"{what}: {len(kept)} usable comparisons ({dict(skipped.counts)} skipped); both the "
                           "training and the held-out split need at least one")  # fmt: skip
    return splits


# ---- the template ------------------------------------------------------------------------------------------------
GPTLINE_TEMPLATE = (
    "{% for message in messages %}{{ roles[message['role']] }}{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] }}{{ end }}{% endgeneration %}"
    "{% else %}{{ message['content'] }}{{ end }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ roles['assistant'] }}{% endif %}"
)


def gptline_chat_template(tokens: dict[str, str | None]) -> str:
    """The Jinja source of gptline's template for these token strings: rendered by transformers and tokenized by
    the tokenizer's `tokenizer.json`, it gives the ids `ChatTemplate.encode` and `prompt` give. Assistant turns
    sit in `{% generation %}` blocks, so transformers' `return_assistant_tokens_mask` (TRL's assistant-only loss)
    marks exactly the tokens `encode` trains."""
    roles = json.dumps({role: tokens[role] for role in ROLES})
    return (
        f"{{% set roles = {roles} %}}{{% set end = {json.dumps(tokens['end_of_turn'])} %}}"
        + (f"{{{{ {json.dumps(tokens['bos'])} }}}}" if tokens.get("bos") else "")
        + GPTLINE_TEMPLATE
    )


def stop_ids(special_ids: dict[str, int | None]) -> list[int]:
    """Where generation stops: the end of a turn (a chat model's answer) or of a text (a base model's); what the
    export's generation_config.json names as EOS, so servers stop where `gptline chat` does."""
    return list(dict.fromkeys(special_ids[k] for k in ("end_of_turn", "end_of_text") if special_ids.get(k) is not None))


def jinja_environment():
    """A sandboxed Jinja environment like the one transformers renders chat templates in."""
    from datetime import datetime

    from jinja2 import nodes
    from jinja2.exceptions import TemplateError
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` marks what the model generates; rendering ignores it."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    def raise_exception(message: str):
        raise TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, "jinja2.ext.loopcontrols"])  # fmt: skip
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    """Messages to token ids with the tokenizer's role tokens (the ids come from `tokenizer_meta.json`).

    A tokenizer artifact of the tokenizer stage is encoded here by ids: the role token, the content's pieces, the
    end-of-turn token. A tokenizer that came with an imported model has a Jinja chat template in its
    `tokenizer_meta.json` (the model's own, or gptline's for its added tokens): a conversation is rendered with it
    and the text tokenized with special tokens matched, exactly as transformers does; the tokens trained are those of
    each assistant turn's text up to and including its end-of-turn token, found by rendering the conversation up to
    that turn (which the template must render as a prefix of the whole)."""

    def __init__(self, tokenizer_dir: Path):
        from gptline.data.tokenizer import META, load_tokenizer

        self.directory = Path(tokenizer_dir)
        meta = json.loads((self.directory / META).read_text())
        self.ids: dict[str, int] = meta["special_ids"]
        self.tokens: dict[str, str | None] = meta["special_tokens"]
        self.tokenizer = load_tokenizer(self.directory)  # any kind: encode, decode
        self.role_ids = {"system": self.ids["system"], "user": self.ids["user"], "assistant": self.ids["assistant"]}
        self.jinja: str = meta.get("chat_template") or gptline_chat_template(self.tokens)
        self._rendered = None
        if "chat_template" in meta:
            self._rendered = jinja_environment().from_string(self.jinja)
            self._globals = {f"{name}_token": self.tokens.get(name) for name in ("bos", "unk", "pad")}
            self._globals["eos_token"] = self.tokens.get("end_of_text")

    @property
    def end_of_turn(self) -> int:
        return self.ids["end_of_turn"]

    @property
    def own_template(self) -> bool:
        """True when the model's own Jinja template decides the token sequence, not gptline's role tokens."""
        return self.jinja != gptline_chat_template(self.tokens)

    def render(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        """The conversation as text through the Jinja template (what transformers' apply_chat_template renders)."""
        from jinja2.exceptions import TemplateError

        from pipeline.errors import GptlineError

        template = self._rendered or jinja_environment().from_string(self.jinja)
        context = {} if self._rendered is None else self._globals
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
        except TemplateError as e:
            raise GptlineError(f"{self.directory}: the chat template refuses the conversation: {e}") from e

    def encode(self, messages: list[Message]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids, and a mask of the tokens the model learns to produce (assistant content and its end)."""
        if self._rendered is not None:
            return self._encode_rendered(messages)
        ids, trained = [self.ids["bos"]], [False]
        for message in messages:
            content = self.tokenizer.encode(message["content"])
            learn = message["role"] == "assistant"
            ids += [self.role_ids[message["role"]], *content, self.end_of_turn]
            trained += [False] + [learn] * (len(content) + 1)
        return np.array(ids, dtype=np.int64), np.array(trained, dtype=bool)

    def _encode_rendered(self, messages: list[Message]) -> tuple[np.ndarray, np.ndarray]:
        from pipeline.errors import GptlineError

        text = self.render(messages)
        ids, starts = self.tokenizer.encode_rendered(text)
        trained = np.zeros(len(ids), dtype=bool)
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before, through = (
                self.render(messages[:turn], add_generation_prompt=True),
                self.render(messages[: turn + 1]),
            )
            if not (text.startswith(before) and text.startswith(through)):
                raise GptlineError(f"{self.directory}: the chat template does not render a conversation's first "
                                   f"turns as a prefix of the whole (turn {turn}); its assistant tokens cannot be "
                                   "found")  # fmt: skip
            for k, start in enumerate(starts):
                if len(before) <= start < len(through):
                    trained[k] = True
                    if ids[k] == self.end_of_turn:
                        break
        return np.array(ids, dtype=np.int64), trained

    def prompt(self, messages: list[Message]) -> list[int]:
        """The generation prompt: the conversation so far, then the assistant's role token."""
        if self._rendered is not None:
            return self.tokenizer.encode_rendered(self.render(messages, add_generation_prompt=True))[0]
        return [*self.encode(messages)[0].tolist(), self.ids["assistant"]]

    def reward_input(self, prompt: list[Message], response: str) -> np.ndarray:
        """Prompt and response as a conversation, then the reward token the RM reads its scalar at."""
        ids, _ = self.encode([*prompt, {"role": "assistant", "content": response}])
        return np.append(ids, self.ids["reward"])

    def messages(self, ids: list[int]) -> list[Message]:
        """The complete turns a sequence of template ids holds (the inverse of `encode`)."""
        if self.own_template:
            from pipeline.errors import GptlineError

            raise GptlineError(f"{self.directory}: conversations in the model's own chat template cannot be read "
                               "back from ids (only gptline's role tokens can)")  # fmt: skip
        roles = {token: role for role, token in self.role_ids.items()}
        found: list[Message] = []
        role, content = None, []
        for token in ids:
            if token in roles:
                role, content = roles[token], []
            elif token == self.end_of_turn and role is not None:
                found.append({"role": role, "content": self.tokenizer.decode(content)})
                role = None
            elif role is not None:
                content.append(token)
        return found

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i != self.end_of_turn])

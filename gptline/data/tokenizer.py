"""One interface over the tokenizers a model can come with: gptline's own sentencepiece model, an imported
sentencepiece `tokenizer.model`, or an imported Hugging Face `tokenizer.json` (read with `tokenizers`), each with the
tokens gptline added to it.

- `encode(text)`: the ids of text as text. A special token's string typed in it stays characters, never the
  token, so a user cannot forge a role marker.
- `encode_rendered(text)`: a rendered chat template tokenized as transformers' `apply_chat_template` does it:
  special tokens' strings become their ids. Each id comes with the character offset where its text starts.
- `decode(ids)`: text without the special tokens (`skip_special_tokens=True`).

Which file a directory's tokenizer is, and which tokens were added to a sentencepiece model (a `.model` file cannot
hold them), is in its `tokenizer_meta.json`. A directory without that entry is a `tokenizer` stage artifact: its
sentencepiece model holds every token itself.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

META = "tokenizer_meta.json"
# gptline's special tokens, by what they are for: the tokenizer stage's defaults, and what an imported tokenizer gets
# added where it has no token of its own for the purpose.
GPTLINE_TOKENS = {
    "unk": "<unk>",
    "bos": "<s>",
    "end_of_text": "</s>",  # separates documents in packed rows; the EOS of a base model's generation
    "pad": "<pad>",
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "end_of_turn": "<|end|>",
    "reward": "<|reward|>",  # the RM reads its scalar here
}
SENTENCEPIECE = "tokenizer.model"
HF_TOKENIZER = "tokenizer.json"


class Tokenizer:
    """What the stages see of a tokenizer, whichever kind it is."""

    vocab_size: int
    # Encoding a text in consecutive pieces cut before a run of spaces gives the ids of the whole text (true of the
    # models the tokenizer stage trains; the tokenize stage then encodes long documents piece by piece).
    splits_at_spaces: bool = False

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_rendered(self, text: str) -> tuple[list[int], list[int]]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def token_id(self, token: str) -> int | None:
        """The id of the token whose string is `token`, if the vocabulary holds one."""
        raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model, plus added tokens with ids after its own pieces."""

    def __init__(self, model_file: Path, added: dict[str, int] | None = None, splits_at_spaces: bool = False):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.pieces = self.sp.get_piece_size()
        self.added = dict(added or {})
        self.vocab_size = max([self.pieces - 1, *self.added.values()]) + 1
        self.splits_at_spaces = splits_at_spaces
        own = [self.sp.id_to_piece(i) for i in range(self.pieces) if self.sp.is_control(i) or self.sp.is_unknown(i)]
        specials = sorted({*own, *self.added}, key=len, reverse=True)  # the longest match first, as a trie would
        self._special_re = re.compile("|".join(re.escape(s) for s in specials if s)) if specials else None

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_rendered(self, text: str) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        starts: list[int] = []
        position = 0
        matches = list(self._special_re.finditer(text)) if self._special_re else []
        for match in [*matches, None]:
            end = match.start() if match else len(text)
            self._encode_span(text[position:end], position, ids, starts)
            if match:
                ids.append(self.token_id(match.group()))
                starts.append(match.start())
                position = match.end()
        return ids, starts

    def _encode_span(self, span: str, offset: int, ids: list[int], starts: list[int]) -> None:
        if not span:
            return
        encoded = span.encode("utf-8")
        for piece in self.sp.encode(span, return_type="proto").pieces:
            ids.append(piece.id)
            starts.append(offset + len(encoded[: piece.begin].decode("utf-8", errors="ignore")))

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([i for i in ids if i < self.pieces])  # control pieces decode to nothing already

    def token_id(self, token: str) -> int | None:
        if token in self.added:
            return self.added[token]
        found = self.sp.piece_to_id(token)
        return found if self.sp.id_to_piece(found) == token else None


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` through `tokenizers`, its added tokens included."""

    def __init__(self, tokenizer_file: Path):
        from tokenizers import Tokenizer as Backend

        self.backend = Backend.from_file(str(tokenizer_file))
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        self.backend.encode_special_tokens = True  # special tokens' strings are text here
        try:
            return self.backend.encode(text, add_special_tokens=False).ids
        finally:
            self.backend.encode_special_tokens = False

    def encode_rendered(self, text: str) -> tuple[list[int], list[int]]:
        encoding = self.backend.encode(text, add_special_tokens=False)
        return encoding.ids, [start for start, _ in encoding.offsets]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)


def load_tokenizer(directory: Path) -> Tokenizer:
    """The tokenizer of a tokenizer artifact, an imported model or a model export."""
    directory = Path(directory)
    meta = json.loads((directory / META).read_text())
    kind = meta.get("tokenizer_file", SENTENCEPIECE)
    if kind == HF_TOKENIZER:
        return HFTokenizer(directory / HF_TOKENIZER)
    # A tokenizer stage artifact (no `tokenizer_file` entry) is trained to split at spaces; an import is not known to.
    return SentencePieceTokenizer(directory / SENTENCEPIECE, meta.get("added_tokens"), "tokenizer_file" not in meta)

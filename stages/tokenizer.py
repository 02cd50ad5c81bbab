"""tokenizer: train a sentencepiece BPE (or char) model on a sample of the corpus, and export it for Hugging Face.

The model is trained to be lossless: identity normalization, no dummy prefix, whitespace kept as it is, digits
split, and byte fallback so any character outside the vocabulary becomes its UTF-8 bytes. decode(encode(text)) ==
text for every text, with one documented exception: U+2581 (sentencepiece's space marker) decodes to a space.
Special tokens (BOS, end-of-text, padding, and the chat role, end-of-turn and reward markers) are control symbols:
their strings in raw text are encoded as ordinary text, so a user cannot forge a role marker; only the chat template
inserts them, by id. (The Hugging Face export marks the chat markers as special added tokens, which transformers
matches in raw text when asked to; the sentencepiece model never does.)

Training input is a deterministic sample of the train split (documents whose hash falls under a threshold, about
`sample_chars` characters), one line per sentencepiece "sentence", capped at `input_sentence_size` lines and
shuffled by sentencepiece: it loads its whole input into memory, so the sample, not the corpus, bounds memory.

The artifact holds `tokenizer.model` (sentencepiece), `tokenizer.json` + `tokenizer_config.json` +
`special_tokens_map.json` (loadable by `transformers.AutoTokenizer`, giving the same ids: the BPE merges are
derived from the sentencepiece pieces and checked on the sample) and `tokenizer_meta.json` (special token ids).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from gptline.data.dedup import unit_hash
from gptline.data.tokenizer import GPTLINE_TOKENS
from pipeline.dag import StageContext
from pipeline.errors import GptlineError

VERSION = 2  # 2: tokenizer.model no longer records the training file's path and the thread count
MODEL_TYPES = ("bpe", "char", "unigram")


@dataclass
class SpecialTokens:
    unk: str = GPTLINE_TOKENS["unk"]
    bos: str = GPTLINE_TOKENS["bos"]
    end_of_text: str = GPTLINE_TOKENS["end_of_text"]
    pad: str = GPTLINE_TOKENS["pad"]
    system: str = GPTLINE_TOKENS["system"]
    user: str = GPTLINE_TOKENS["user"]
    assistant: str = GPTLINE_TOKENS["assistant"]
    end_of_turn: str = GPTLINE_TOKENS["end_of_turn"]
    reward: str = GPTLINE_TOKENS["reward"]

    def chat(self) -> list[str]:
        return [self.system, self.user, self.assistant, self.end_of_turn, self.reward]


@dataclass
class TokenizerConfig:
    vocab_size: int = 4096
    model_type: str = "bpe"  # bpe, char (vocab_size is then an upper bound), unigram
    sample_chars: int = 20_000_000  # characters of training text sampled from the train split
    input_sentence_size: int = 2_000_000  # sentencepiece's cap on lines it loads
    max_sentence_length: int = 16384  # bytes; longer lines are skipped by training (not by encoding)
    character_coverage: float = 0.9999
    byte_fallback: bool = True
    split_digits: bool = True
    seed: int = 0
    special: SpecialTokens = field(default_factory=SpecialTokens)

    def validate(self) -> list[tuple[str, str]]:
        if self.model_type not in MODEL_TYPES:
            return [("model_type", f"must be one of {', '.join(MODEL_TYPES)}, got {self.model_type!r}")]
        if self.vocab_size < 16:
            return [("vocab_size", f"must be >= 16, got {self.vocab_size}")]
        if not 0.9 <= self.character_coverage <= 1.0:
            return [("character_coverage", f"must be in [0.9, 1], got {self.character_coverage}")]
        if self.sample_chars < 1 or self.input_sentence_size < 1:
            return [("sample_chars", "sample_chars and input_sentence_size must be >= 1")]
        return []


def train_documents(corpus: Path) -> list[Path]:
    shards = sorted((corpus / "train").glob("*.parquet"))
    if not shards:
        raise GptlineError(f"{corpus / 'train'}: no Parquet shards to train a tokenizer on")
    return shards


def write_sample(shards: list[Path], sample_chars: int, seed: int, path: Path) -> int:
    """Each distinct train document (first copy) whose hash is under the threshold, line by line."""
    total = 0
    for shard in shards:
        table = pq.read_table(shard, columns=["text", "copy"])
        total += pc.sum(pc.utf8_length(table["text"].filter(pc.equal(table["copy"], 0)))).as_py() or 0
    threshold = min(1.0, sample_chars / max(1, total))
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        for shard in shards:
            table = pq.read_table(shard, columns=["id", "text", "copy"])
            ids = table.column("id").to_pylist()
            chosen = unit_hash(seed, "tokenizer", ids) < threshold
            for keep, text, copy in zip(chosen, *(table.column(c).to_pylist() for c in ("text", "copy")), strict=True):
                if copy == 0 and keep:
                    lines = [line for line in text.split("\n") if line.strip()]
                    f.write("\n".join(lines) + "\n")
                    written += sum(len(line) for line in lines)
    return written


def train(cfg: TokenizerConfig, sample: Path, prefix: Path, threads: int) -> spm.SentencePieceProcessor:
    s = cfg.special
    spm.set_random_generator_seed(cfg.seed)  # input shuffling and sampling
    try:
        spm.SentencePieceTrainer.train(
            input=str(sample),
            model_prefix=str(prefix),
            vocab_size=cfg.vocab_size,
            model_type=cfg.model_type,
            hard_vocab_limit=cfg.model_type != "char",  # a char vocabulary is what the data has, up to vocab_size
            character_coverage=cfg.character_coverage,
            byte_fallback=cfg.byte_fallback,
            split_digits=cfg.split_digits,
            # These four also make tokenize's word-aligned pieces encode exactly as the whole text (see there).
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            input_sentence_size=cfg.input_sentence_size,
            shuffle_input_sentence=True,
            max_sentence_length=cfg.max_sentence_length,
            seed_sentencepiece_size=1_000_000,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            unk_piece=s.unk,
            bos_piece=s.bos,
            eos_piece=s.end_of_text,
            pad_piece=s.pad,
            control_symbols=s.chat(),  # never produced from raw text: a user cannot type a role marker
            num_threads=threads,
            minloglevel=2,
        )
    except RuntimeError as e:
        message = str(e).split("\n")[0]
        if "Vocabulary size too high" in message or "Vocabulary size is too high" in message:
            raise GptlineError(
                f"tokenizer.vocab_size={cfg.vocab_size} is more than the training text supports: {message}"
            ) from e
        if "Vocabulary size is smaller than required" in message:
            raise GptlineError(
                f"tokenizer.vocab_size={cfg.vocab_size} is too small for the characters, byte pieces and special "
                f"tokens it must hold: {message}"
            ) from e
        raise GptlineError(f"sentencepiece training failed on {sample}: {message}") from e
    model = Path(f"{prefix}.model")
    model.write_bytes(without_provenance(model.read_bytes(), prefix.name))
    return spm.SentencePieceProcessor(model_file=str(model))


def without_provenance(model: bytes, name: str) -> bytes:
    """The model less what sentencepiece records of the run that trained it (the training file's path, the
    output prefix, the thread count), so the same text gives the same bytes wherever and on whatever it ran."""
    proto = model_pb2.ModelProto()
    proto.ParseFromString(model)
    del proto.trainer_spec.input[:]
    proto.trainer_spec.model_prefix = name
    proto.trainer_spec.ClearField("num_threads")
    return proto.SerializeToString()


def hf_tokenizer(sp: spm.SentencePieceProcessor, special: SpecialTokens):
    """The same segmentation as a `tokenizers` BPE: sentencepiece's pieces as the vocabulary, and as merges every
    split of a piece into two pieces, ranked by the merged piece's id (sentencepiece merges by piece score, and
    ids are in score order)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    chat = set(special.chat())
    merges = []
    for piece, pid in vocab.items():
        if sp.is_byte(pid) or sp.is_control(pid) or sp.is_unknown(pid) or piece in chat:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((pid, vocab[left], vocab[right], left, right))
    merges.sort()
    model = models.BPE(
        vocab=vocab, merges=[(left, right) for *_, left, right in merges], unk_token=special.unk, fuse_unk=True,
        byte_fallback=True,
    )  # fmt: skip
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.pre_tokenizer = pre_tokenizers.Digits(individual_digits=True)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special.chat()])
    return tokenizer


def export_hf(sp: spm.SentencePieceProcessor, special: SpecialTokens, out_dir: Path, max_length: int) -> None:
    hf_tokenizer(sp, special).save(str(out_dir / "tokenizer.json"))
    tokens = {"bos_token": special.bos, "eos_token": special.end_of_text, "unk_token": special.unk,
              "pad_token": special.pad, "additional_special_tokens": special.chat()}  # fmt: skip
    (out_dir / "special_tokens_map.json").write_text(json.dumps(tokens, indent=2) + "\n")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,
        **tokens,
    }  # fmt: skip  (as sentencepiece: markers in text are text)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def check_agreement(sp: spm.SentencePieceProcessor, special: SpecialTokens, sample: Path, limit: int = 2000) -> int:
    """Lines of the sample where the HF export and sentencepiece disagree (should be none)."""
    tokenizer = hf_tokenizer(sp, special)
    with open(sample, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for _, line in zip(range(limit), f, strict=False)]
    ids = [e.ids for e in tokenizer.encode_batch(lines, add_special_tokens=False)]
    return sum(a != b for a, b in zip(ids, sp.encode(lines), strict=True))


def run(cfg: TokenizerConfig, inputs: dict[str, Path], out_dir: Path, ctx: StageContext) -> dict[str, Any]:
    work = out_dir / "_work"
    work.mkdir(parents=True, exist_ok=True)
    sample = work / "sample.txt"
    sample_chars = write_sample(train_documents(inputs["crawl_mix"]), cfg.sample_chars, cfg.seed, sample)
    if sample_chars == 0:
        raise GptlineError(f"{inputs['crawl_mix']}: the train split holds no text to train a tokenizer on")
    start = time.perf_counter()
    sp = train(cfg, sample, out_dir / "tokenizer", threads=max(1, int(ctx.resources.num_cpus)))
    train_seconds = time.perf_counter() - start
    (out_dir / "tokenizer.vocab").unlink(missing_ok=True)  # a readable copy of the model's pieces; not needed
    disagreements = check_agreement(sp, cfg.special, sample)
    if disagreements:
        raise GptlineError(f"the Hugging Face export disagrees with sentencepiece on {disagreements} sample lines")
    export_hf(sp, cfg.special, out_dir, max_length=1 << 20)
    with open(sample, encoding="utf-8") as f:
        probe = f.read(1_000_000)
    ids = {name: sp.piece_to_id(piece) for name, piece in asdict(cfg.special).items()}
    meta = {"vocab_size": sp.get_piece_size(), "model_type": cfg.model_type, "special_ids": ids,
            "special_tokens": asdict(cfg.special)}  # fmt: skip
    (out_dir / "tokenizer_meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(work)
    return {
        "vocab_size": sp.get_piece_size(),
        "sample_chars": sample_chars,
        "chars_per_token": len(probe) / max(1, len(sp.encode(probe))),
        "train_seconds": train_seconds,
    }

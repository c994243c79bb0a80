"""The text tokenizer every stage shares: CLIP's BPE on the Rust `tokenizers` library.

`clip_tokenizer()` builds, from the vocabulary file open_clip ships, a tokenizer whose ids are
identical to `open_clip.tokenize`: open_clip's own text cleaning runs in Python (ftfy, HTML
unescaping, whitespace folding, lower-casing: things the Rust normalizers do differently), the
split regex, byte-level BPE with `</w>` word ends, start/end tokens, truncation that keeps the
end token, and zero padding run in Rust, in batches. `Tokenizer.load(path)` reads any
tokenizer.json, `save(path)` writes one, `train_bpe` fits a new vocabulary on captions.
"""

from __future__ import annotations

import gzip
import hashlib
from functools import lru_cache
from typing import Iterable

import numpy as np
import regex
import torch
from open_clip.tokenizer import _clean_lower, bytes_to_unicode, default_bpe
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as RustTokenizer

from litpipe.errors import UserError

START, END = "<start_of_text>", "<end_of_text>"
CLEANING = "open_clip._clean_lower/1"  # bump if the Python-side cleaning changes: it changes every id
# open_clip's split pattern without its special-token alternatives (handled in `_split_specials`).
CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# open_clip's full pattern: only used to find where it reads a special token inside a caption.
_OPEN_CLIP_SPLIT = regex.compile(f"{START}|{END}|{CLIP_SPLIT}", regex.IGNORECASE)


class TokenizerError(UserError):
    """A tokenizer file that cannot be read or used."""


class Tokenizer:
    """Batch text -> LongTensor [N, context_length] with start/end tokens and zero padding."""

    def __init__(self, rust: RustTokenizer, context_length: int = 77):
        self.rust = rust
        self.context_length = context_length
        self.start_id = rust.token_to_id(START)
        self.end_id = rust.token_to_id(END)
        if self.start_id is None or self.end_id is None:
            raise TokenizerError(f"the tokenizer has no {START} / {END} tokens; train it with `litpipe tokenizer train`")
        self.vocab_size = rust.get_vocab_size()

    @classmethod
    def load(cls, path: str, context_length: int = 77) -> Tokenizer:
        """Any tokenizer.json (by fsspec URL); open_clip's cleaning is applied before it."""
        import fsspec

        try:
            with fsspec.open(path, "r", encoding="utf-8") as f:
                rust = RustTokenizer.from_str(f.read())
        except FileNotFoundError:
            raise TokenizerError(f"{path}: no such tokenizer file; set train.tokenizer to `clip` or a tokenizer.json") from None
        except Exception as err:
            raise TokenizerError(f"{path}: not a tokenizer.json ({err}); write one with `litpipe tokenizer train`") from None
        return cls(rust, context_length)

    def fingerprint(self) -> dict:
        """What decides the ids: the whole tokenizer.json (vocabulary, merges, special tokens,
        pipeline), the context length and the Python-side cleaning; keys a token cache."""
        return {"sha256": hashlib.sha256(self.rust.to_str().encode()).hexdigest(), "context_length": self.context_length,
                "cleaning": CLEANING}

    def save(self, path: str) -> None:
        import fsspec

        with fsspec.open(path, "w", encoding="utf-8") as f:
            f.write(self.rust.to_str())

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.LongTensor:
        """Same contract as `open_clip.tokenize`: one row per text, truncated rows end in the end token."""
        if isinstance(texts, str):
            texts = [texts]
        ctx = context_length or self.context_length
        pieces = [_split_specials(_clean_lower(t)) for t in texts]
        flat = [p for parts in pieces for p in parts if p not in (START, END)]
        encoded = iter(self.rust.encode_batch(flat, add_special_tokens=False)) if flat else iter(())
        out = np.zeros((len(texts), ctx), dtype=np.int64)
        special = {START: self.start_id, END: self.end_id}
        for row, parts in enumerate(pieces):
            ids = [self.start_id]
            for part in parts:
                ids.extend([special[part]] if part in special else next(encoded).ids)
            ids = ids[: ctx - 1] + [self.end_id]
            out[row, : len(ids)] = ids
        return torch.from_numpy(out)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of one row: the ids between the start and the first end token."""
        ids = list(ids)
        ids = ids[1:] if ids and ids[0] == self.start_id else ids
        return self.rust.decode(ids[: ids.index(self.end_id)] if self.end_id in ids else ids)


def _split_specials(text: str) -> list[str]:
    """Text split around the special tokens open_clip's regex reads in it (rare; exact in all cases).

    Words re-joined with spaces split back into the same words, so the pieces encode as open_clip.
    """
    if START not in text and END not in text:
        return [text]
    parts, words = [], []
    for word in _OPEN_CLIP_SPLIT.findall(text):
        if word in (START, END):
            parts += [" ".join(words), word] if words else [word]
            words = []
        else:
            words.append(word)
    return parts + ([" ".join(words)] if words else [])


def _clip_pipeline(model: models.BPE) -> RustTokenizer:
    """open_clip's split regex + byte-level alphabet around a BPE model with `</w>` word ends."""
    rust = RustTokenizer(model)
    rust.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    rust.decoder = decoders.Sequence([decoders.BPEDecoder(suffix="</w>"), decoders.ByteLevel()])
    return rust


def _with_specials(rust: RustTokenizer) -> RustTokenizer:
    """Start/end ids as post-processing, so a saved tokenizer.json frames texts on its own."""
    start, end = rust.token_to_id(START), rust.token_to_id(END)
    rust.post_processor = processors.TemplateProcessing(
        single=f"{START} $A {END}", special_tokens=[(START, start), (END, end)]
    )
    return rust


@lru_cache(maxsize=4)
def _clip_rust() -> RustTokenizer:
    with gzip.open(default_bpe()) as f:
        merges = f.read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    alphabet = list(bytes_to_unicode().values())
    vocab = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges] + [START, END]
    model = models.BPE(
        vocab={tok: i for i, tok in enumerate(vocab)}, merges=merges, end_of_word_suffix="</w>",
        continuing_subword_prefix="", fuse_unk=False,
    )
    return _with_specials(_clip_pipeline(model))


def clip_tokenizer(context_length: int = 77) -> Tokenizer:
    """The CLIP tokenizer, ids identical to `open_clip.tokenize(texts, context_length)`."""
    return Tokenizer(_clip_rust(), context_length)


def load_tokenizer(spec: str, context_length: int = 77) -> Tokenizer:
    """`clip` or the URL of a tokenizer.json (train.tokenizer in pipeline.yaml)."""
    return clip_tokenizer(context_length) if spec == "clip" else Tokenizer.load(spec, context_length)


def train_bpe(texts: Iterable[str], vocab_size: int, context_length: int = 77) -> Tokenizer:
    """Fit a CLIP-style BPE (same cleaning and split) of `vocab_size` ids on captions.

    Start/end take the two highest ids and the pad id is 0, as in CLIP: open_clip's text tower
    pools at the argmax id, which must be the end token.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < 2 * len(alphabet) + 2:
        raise TokenizerError(f"--vocab-size {vocab_size} is too small; the byte alphabet alone needs {2 * len(alphabet) + 2}")
    rust = _clip_pipeline(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix="", fuse_unk=False))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 2, initial_alphabet=alphabet, end_of_word_suffix="</w>",
        show_progress=False, special_tokens=[],
    )
    rust.train_from_iterator((_clean_lower(t) for t in texts), trainer=trainer)
    rust.add_special_tokens([START, END])
    return Tokenizer(_with_specials(rust), context_length)

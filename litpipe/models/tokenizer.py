"""The text tokenizers every stage shares, on the Rust `tokenizers` library.

`clip_tokenizer()` builds, from the vocabulary file open_clip ships, a tokenizer whose ids are
identical to `open_clip.tokenize`: open_clip's own text cleaning runs in Python (ftfy, HTML
unescaping, whitespace folding, lower-casing: things the Rust normalizers do differently), the
split regex, byte-level BPE with `</w>` word ends, start/end tokens, truncation that keeps the
end token, and zero padding run in Rust, in batches. `hf_tokenizer()` takes a Hugging Face model's
own tokenizer (WordPiece, SentencePiece, BPE) with its special tokens and padding. `Tokenizer.load(path)`
reads any tokenizer.json, `save(path)` writes one; `train_bpe` and `train_unigram` fit a new vocabulary
on captions. A BPE fitted here has CLIP's id layout, so open_clip's own `SimpleTokenizer` reads its
merges file (`save_merges`) and gives the same ids.
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import json
from functools import lru_cache
from typing import Iterable

import numpy as np
import regex
import torch
from open_clip import tokenizer as open_clip_tokenizer
from open_clip.tokenizer import bytes_to_unicode, default_bpe, get_clean_fn
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as RustTokenizer

from litpipe.errors import UserError

START, END = "<start_of_text>", "<end_of_text>"
# open_clip's text cleaning, run before the tokenizer: CLIP's lower-cases, the native one only folds whitespace.
CLEANING = {"clip": "lower", "native": "whitespace"}
_clean_lower, _clean_whitespace = get_clean_fn("lower"), get_clean_fn("whitespace")
# SimpleTokenizer reads at most this many merges (CLIP's 49,408 ids less the 512 byte tokens and 2 specials).
MAX_CLIP_MERGES = 49152 - 256 - 2
# open_clip's split pattern without its special-token alternatives (handled in `_split_specials`).
CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# open_clip's full pattern: only used to find where it reads a special token inside a caption.
_OPEN_CLIP_SPLIT = regex.compile(f"{START}|{END}|{CLIP_SPLIT}", regex.IGNORECASE)


class TokenizerError(UserError):
    """A tokenizer file that cannot be read or used."""


class Tokenizer:
    """Batch text -> LongTensor [N, context_length]: one row per text, framed by special tokens, padded.

    Two framings, chosen by the vocabulary:
    - `clip` (a vocabulary with CLIP's <start_of_text> / <end_of_text>: CLIP's BPE, `litpipe tokenizer train
      --model bpe`): open_clip's cleaning in Python, start/end, truncation that keeps the end token, zero
      padding; ids identical to `open_clip.tokenize`.
    - `native` (any other tokenizer.json: BERT's WordPiece, SentencePiece Unigram, RoBERTa's BPE, ...): the
      file's own normaliser, pre-tokeniser and special-token template, truncated to the context length and
      padded with its pad token; ids identical to `transformers` and open_clip's HFTokenizer (whose
      whitespace folding runs first, as there).
    """

    def __init__(self, rust: RustTokenizer, context_length: int = 77):
        self.rust = rust
        self.context_length = context_length
        self.vocab_size = rust.get_vocab_size()
        start, end = rust.token_to_id(START), rust.token_to_id(END)
        self.framing = "clip" if start is not None and end is not None else "native"
        if self.framing == "clip":
            self.start_id, self.end_id, self.pad_id = start, end, 0
            return
        self.pad_id = _pad_id(rust)
        self._framed = {context_length: _framed(rust, context_length, self.pad_id)}
        specials = [i for i in self._framed[context_length].encode("").ids if i != self.pad_id]  # the empty text, framed
        self.start_id = None
        self.end_id = specials[-1] if specials else None  # where a CLIP-style tower pools (`eos`)

    @classmethod
    def load(cls, path: str, context_length: int = 77) -> Tokenizer:
        """Any tokenizer.json (by fsspec URL)."""
        import fsspec

        try:
            with fsspec.open(path, "r", encoding="utf-8") as f:
                rust = RustTokenizer.from_str(f.read())
        except FileNotFoundError:
            raise TokenizerError(f"{path}: no such tokenizer file; set train.tokenizer to `auto`, `clip`, a tokenizer.json "
                                 "or a Hugging Face model") from None
        except Exception as err:
            raise TokenizerError(f"{path}: not a tokenizer.json ({err}); write one with `litpipe tokenizer train`") from None
        return cls(rust, context_length)

    def fingerprint(self) -> dict:
        """What decides the ids: the whole tokenizer.json (vocabulary, merges, special tokens,
        pipeline), the context length and the Python-side cleaning; keys a token cache."""
        return {"sha256": hashlib.sha256(self.rust.to_str().encode()).hexdigest(), "context_length": self.context_length,
                "cleaning": cleaning_fingerprint(CLEANING[self.framing])}

    def save(self, path: str) -> None:
        import fsspec

        with fsspec.open(path, "w", encoding="utf-8") as f:
            f.write(self.rust.to_str())

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.LongTensor:
        """Same contract as `open_clip.tokenize`: one row per text, truncated rows keep their end token."""
        if isinstance(texts, str):
            texts = [texts]
        ctx = context_length or self.context_length
        if self.framing == "native":
            if ctx not in self._framed:
                self._framed[ctx] = _framed(self.rust, ctx, self.pad_id)
            encoded = self._framed[ctx].encode_batch([_clean_whitespace(t) for t in texts]) if texts else []
            return torch.tensor([e.ids for e in encoded], dtype=torch.long).reshape(len(texts), ctx)
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

    def save_merges(self, path: str) -> None:
        """The merges as open_clip's `SimpleTokenizer(bpe_path=...)` reads them (gzip, a header line, one
        merge per line), for a BPE in CLIP's id layout: its byte tokens, the same with `</w>`, each merge's
        token in merge order, then start and end. Every BPE `train_bpe` fits has that layout."""
        model = json.loads(self.rust.to_str())["model"]
        merges = _merges(model)
        alphabet = list(bytes_to_unicode().values())
        layout = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges] + [START, END]
        vocab = {**model.get("vocab", {}), **{t.content: i for i, t in self.rust.get_added_tokens_decoder().items()}}
        if self.framing != "clip" or vocab != {token: i for i, token in enumerate(layout)}:
            raise TokenizerError("this tokenizer's ids are not laid out as open_clip's SimpleTokenizer reads a BPE file; "
                                 "fit it again with `litpipe tokenizer train --model bpe`")
        if len(merges) > MAX_CLIP_MERGES:
            raise TokenizerError(f"{len(merges)} merges: open_clip's SimpleTokenizer reads at most {MAX_CLIP_MERGES}; "
                                 f"fit a vocabulary of at most {MAX_CLIP_MERGES + 514} ids")
        import fsspec

        with fsspec.open(path, "wb") as f:  # no newline after the last merge: SimpleTokenizer would read it as one
            f.write(gzip.compress(("#version: litpipe\n" + "\n".join(" ".join(m) for m in merges)).encode()))

    def decode(self, ids: Iterable[int]) -> str:
        """The text of one row, without its special tokens and padding."""
        ids = list(ids)
        if self.framing == "native":
            return self.rust.decode([i for i in ids if i != self.pad_id], skip_special_tokens=True)
        ids = ids[1:] if ids and ids[0] == self.start_id else ids
        return self.rust.decode(ids[: ids.index(self.end_id)] if self.end_id in ids else ids)


PAD_TOKENS = ("[PAD]", "<pad>", "<|pad|>", "<PAD>")


def _pad_id(rust: RustTokenizer) -> int:
    """The pad id a native tokenizer.json declares (its padding section, else a conventional pad token)."""
    if rust.padding:
        return rust.padding["pad_id"]
    for token in PAD_TOKENS:
        if rust.token_to_id(token) is not None:
            return rust.token_to_id(token)
    raise TokenizerError(f"the tokenizer has neither CLIP's {START}/{END} nor a pad token ({', '.join(PAD_TOKENS)}); "
                         "add one, or fit a tokenizer with `litpipe tokenizer train`")


def _framed(rust: RustTokenizer, context_length: int, pad_id: int) -> RustTokenizer:
    """A copy of a native tokenizer that truncates to, and pads to, `context_length` (as transformers'
    `padding="max_length", truncation=True` does), leaving the original's settings alone."""
    framed = RustTokenizer.from_str(rust.to_str())
    framed.enable_truncation(context_length)
    framed.enable_padding(length=context_length, pad_id=pad_id, pad_token=rust.id_to_token(pad_id))
    return framed


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
        merges = f.read().decode("utf-8").split("\n")[1 : MAX_CLIP_MERGES + 1]
    return _with_specials(_clip_pipeline(_clip_bpe([tuple(m.split()) for m in merges])))


def _merges(model: dict) -> list[tuple[str, str]]:
    """A tokenizer.json BPE model's merges, in either form `tokenizers` writes ("a b" or ["a", "b"])."""
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]


def _clip_bpe(merges: list[tuple[str, str]]) -> models.BPE:
    """A byte-level BPE with `</w>` word ends in CLIP's id layout: bytes, bytes + `</w>`, merges, start, end."""
    alphabet = list(bytes_to_unicode().values())
    vocab = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges] + [START, END]
    return models.BPE(vocab={tok: i for i, tok in enumerate(vocab)}, merges=merges, end_of_word_suffix="</w>",
                      continuing_subword_prefix="", fuse_unk=False)


@lru_cache(maxsize=2)
def cleaning_fingerprint(kind: str) -> dict:
    """What open_clip's cleaning runs (its source: the cleaning function and the helpers it calls) and the ftfy it
    calls: a newer open_clip or ftfy that cleans differently gives new ids, so it keys the token cache."""
    import ftfy

    source = "".join(inspect.getsource(f) for f in (get_clean_fn(kind), open_clip_tokenizer.basic_clean,
                                                    open_clip_tokenizer.whitespace_clean))
    return {"open_clip_clean": kind, "source_sha256": hashlib.sha256(source.encode()).hexdigest()[:16],
            "ftfy": ftfy.__version__}


def clip_tokenizer(context_length: int = 77) -> Tokenizer:
    """The CLIP tokenizer, ids identical to `open_clip.tokenize(texts, context_length)`."""
    return Tokenizer(_clip_rust(), context_length)


def load_tokenizer(spec: str, context_length: int = 77, hf_model: str | None = None) -> Tokenizer:
    """train.tokenizer: `auto` (the tokenizer of `hf_model` when the tower is one, else CLIP's), `clip`,
    the URL of a tokenizer.json, or a Hugging Face model (hub id or local folder) whose tokenizer to use."""
    if spec == "auto":
        return hf_tokenizer(hf_model, context_length) if hf_model else clip_tokenizer(context_length)
    if spec == "clip":
        return clip_tokenizer(context_length)
    if spec.endswith(".json"):
        return Tokenizer.load(spec, context_length)
    return hf_tokenizer(spec, context_length)


def hf_tokenizer(source: str, context_length: int = 77) -> Tokenizer:
    """A Hugging Face model's own tokenizer, as `transformers` loads it (its fast, Rust form; converted from
    vocab.txt or a SentencePiece model where the model ships no tokenizer.json), with its pad token."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise TokenizerError(f"{source}: a Hugging Face tokenizer needs `transformers`; pip install 'litpipe[hf]'") from None
    try:
        hf = AutoTokenizer.from_pretrained(source)
    except Exception as err:
        raise TokenizerError(f"{source}: transformers could not load its tokenizer ({err}); give a local model folder, "
                             "a hub id (needs the network), or train.tokenizer: path/to/tokenizer.json") from None
    if hf.pad_token_id is None:
        raise TokenizerError(f"{source}: its tokenizer has no pad token; give train.tokenizer a tokenizer.json with one")
    rust = RustTokenizer.from_str(hf.backend_tokenizer.to_str())
    rust.no_truncation()
    rust.enable_padding(pad_id=hf.pad_token_id, pad_token=hf.pad_token)  # so the saved file names its pad token
    return Tokenizer(rust, context_length)


def train_bpe(texts: Iterable[str], vocab_size: int, context_length: int = 77) -> Tokenizer:
    """Fit a CLIP-style BPE (same cleaning and split) of `vocab_size` ids on captions, laid out as CLIP's.

    The ids are CLIP's layout (every byte token, the same with `</w>`, the merges in order, start, end), so
    open_clip's SimpleTokenizer reads the merges alone and gives the same ids; end has the highest id (open_clip's
    text tower pools at the argmax id) and the pad id is 0, as in CLIP. Fewer ids come back where the captions
    hold fewer pairs to merge.
    """
    alphabet = list(bytes_to_unicode().values())
    wanted = vocab_size - 2 * len(alphabet) - 2
    if wanted < 0:
        raise TokenizerError(f"--vocab-size {vocab_size} is too small; the byte alphabet alone needs {2 * len(alphabet) + 2}")
    if wanted > MAX_CLIP_MERGES:
        raise TokenizerError(f"--vocab-size {vocab_size} is more than open_clip's SimpleTokenizer reads "
                             f"({MAX_CLIP_MERGES + 514}); choose at most that")
    fitted = _clip_pipeline(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix="", fuse_unk=False))
    trainer = trainers.BpeTrainer(  # its vocabulary counts only the `</w>` bytes seen: it yields >= `wanted` merges
        vocab_size=vocab_size - 2, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix="</w>",
        show_progress=False, special_tokens=[],
    )
    fitted.train_from_iterator((_clean_lower(t) for t in texts), trainer=trainer)
    merges = _merges(json.loads(fitted.to_str())["model"])[:wanted]  # the first merges rank highest
    return Tokenizer(_with_specials(_clip_pipeline(_clip_bpe(merges))), context_length)


def train_unigram(texts: Iterable[str], vocab_size: int, context_length: int = 77) -> Tokenizer:
    """Fit a SentencePiece-style Unigram vocabulary (NFKC, `▁` word marks, T5's `<pad>` 0, `</s>` 1,
    `<unk>` 2 and an end token after every text) of `vocab_size` ids on captions: a native tokenizer for
    scripts CLIP's byte-level BPE splits badly."""
    rust = RustTokenizer(models.Unigram())
    rust.normalizer = normalizers.NFKC()
    rust.pre_tokenizer = pre_tokenizers.Metaspace()
    rust.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    rust.train_from_iterator((_clean_whitespace(t) for t in texts), trainer=trainer)
    rust.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    rust.enable_padding(pad_id=0, pad_token="<pad>")
    return Tokenizer(rust, context_length)

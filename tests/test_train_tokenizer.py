"""The CLIP tokenizer on `tokenizers` against open_clip.tokenize, and tokenizer files."""

import random

import open_clip
import torch

from litpipe.models.tokenizer import Tokenizer, clip_tokenizer, train_bpe

PIECES = [
    "a photo of a", "cat", "Dog", "ÉLAN", "naïve café", "straße", "İstanbul", "ΣΊΣΥΦΟΣ", "日本語", "東京タワー",
    "😀", "🐈‍⬛", "👩🏽‍🚀", "🇯🇵", "❤️", "&amp;", "&lt;b&gt;", "&amp;amp;", "&quot;hi&quot;", "&#39;", "&nbsp;",
    "it's", "WE'LL", "they'd", "'s", "...", "!!!", "?!", "(x)", "[1]", "--", "—", "“quoted”", "$9.99", "100%",
    "3.14159", "1,000,000", "e-mail", "C++", "#hashtag", "@user", "http://ex.com/a?b=c", "\t", "\n", "  ",
    "\u00a0", "\u200b", "Ã©", "â€™", "<start_of_text>", "<end_of_text>", "x<end_of_text>", "!<start_of_text>",
    "ﬁ", "Ⅻ", "١٢٣", "مرحبا", "שלום", "привет", "ä", "a\u0308", "ǅ", "ß", "ℌ", "🏳️‍🌈", "\x00", "\\", "_",
]


def varied_captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = ["", " ", "a " * 200, "x" * 500]
    while len(out) < n:
        k = rng.choice([1, 2, 3, 5, 8, 40])
        out.append(rng.choice(["", " ", "  "]).join(rng.choice(PIECES) for _ in range(k)))
    return out


def test_clip_tokenizer_ids_equal_open_clip_tokenize_on_varied_captions():
    captions = varied_captions(1200)
    for ctx, rows in ((77, 1200), (16, 300)):
        captions = captions[:rows]
        expected = open_clip.tokenize(captions, context_length=ctx)
        got = clip_tokenizer(ctx)(captions)
        assert got.dtype == torch.long and got.shape == (len(captions), ctx)
        mismatched = [captions[i] for i in range(len(captions)) if not torch.equal(got[i], expected[i])]
        assert not mismatched, mismatched[:5]


def test_saved_tokenizer_json_loads_back_with_the_same_ids(tmp_path):
    captions = varied_captions(200, seed=1)
    path = str(tmp_path / "tokenizer.json")
    clip_tokenizer(32).save(path)
    assert torch.equal(Tokenizer.load(path, 32)(captions), open_clip.tokenize(captions, 32))


def test_trained_bpe_puts_end_token_at_the_highest_id_and_round_trips(tmp_path):
    captions = [f"a red emoji of a {w} number {i}" for i, w in enumerate(["cat", "dog", "smiling face", "rocket"] * 50)]
    tok = train_bpe(captions, vocab_size=700, context_length=16)
    ids = tok(["a red emoji of a cat", "rocket"])
    assert tok.end_id == tok.vocab_size - 1 and tok.start_id == tok.vocab_size - 2
    assert ids[0, 0] == tok.start_id and (ids.argmax(-1) == (ids != 0).sum(-1) - 1).all()
    assert tok.decode(ids[0].tolist()).strip() == "a red emoji of a cat"
    tok.save(str(tmp_path / "t.json"))
    assert torch.equal(Tokenizer.load(str(tmp_path / "t.json"), 16)(["rocket"]), ids[1:])


def test_a_fitted_bpe_is_read_by_open_clips_own_simple_tokenizer_with_the_same_ids(tmp_path):
    from open_clip.tokenizer import SimpleTokenizer

    captions = varied_captions(1500, seed=2)
    tok = train_bpe(captions, vocab_size=900, context_length=24)
    assert tok.vocab_size == 900  # the captions hold enough pairs: exactly the ids asked for
    tok.save_merges(str(tmp_path / "bpe.txt.gz"))
    theirs = SimpleTokenizer(bpe_path=str(tmp_path / "bpe.txt.gz"), context_length=24)
    assert theirs.vocab_size == tok.vocab_size and theirs.eot_token_id == tok.end_id
    held_out = varied_captions(600, seed=3)
    expected, got = theirs(held_out), tok(held_out)
    mismatched = [held_out[i] for i in range(len(held_out)) if not torch.equal(got[i], expected[i])]
    assert not mismatched, mismatched[:5]
    assert (got > 600).any()  # merges, not bytes alone, were compared

    clip_tokenizer(24).save_merges(str(tmp_path / "clip.txt.gz"))  # CLIP's own merges round-trip to its ids
    assert torch.equal(SimpleTokenizer(bpe_path=str(tmp_path / "clip.txt.gz"), context_length=24)(held_out),
                       open_clip.tokenize(held_out, 24))


def test_a_token_cache_key_follows_open_clips_cleaning_code_and_ftfy(monkeypatch):
    import ftfy
    import open_clip.tokenizer as open_clip_tokenizer

    from litpipe.models.tokenizer import cleaning_fingerprint

    before = clip_tokenizer(16).fingerprint()
    try:
        cleaning_fingerprint.cache_clear()
        monkeypatch.setattr(ftfy, "__version__", "0.0-other")
        assert clip_tokenizer(16).fingerprint() != before
        monkeypatch.undo()
        cleaning_fingerprint.cache_clear()
        assert clip_tokenizer(16).fingerprint() == before

        def whitespace_clean(text):  # a newer open_clip that folds whitespace differently
            return " ".join(text.split(" "))

        monkeypatch.setattr(open_clip_tokenizer, "whitespace_clean", whitespace_clean)
        cleaning_fingerprint.cache_clear()
        assert clip_tokenizer(16).fingerprint() != before
    finally:
        monkeypatch.undo()
        cleaning_fingerprint.cache_clear()

"""Text towers users bring: Hugging Face language models (tiny BERT and mT5 saved here) in LiT's Lu/LU/LL
settings, their own tokenizers against transformers and an independent reference, export to plain open_clip."""

import json
import random

import open_clip
import pytest
import torch
from conftest import tiny_train_config as config

from litpipe.config import validate_config
from litpipe.models.text_tower import build_text_tower, load_text_tower
from litpipe.models.tokenizer import Tokenizer, hf_tokenizer, load_tokenizer, train_bpe, train_unigram
from litpipe.train_text.export import export_model
from litpipe.train_text.trainer import build_run, train

transformers = pytest.importorskip("transformers")

WORDS = {
    "latin": ["red", "cat", "smiling", "face", "rocket", "naïve", "café", "straße", "élan", "İstanbul"],
    "cyrillic": ["красный", "кот", "улыбка", "ракета"], "greek": ["κόκκινο", "γάτα", "φεγγάρι"],
    "cjk": ["赤い", "猫", "笑顔", "東京", "ロケット", "고양이", "달"], "arabic": ["أحمر", "قطة", "قمر"],
    "hebrew": ["אדום", "חתול"], "devanagari": ["लाल", "बिल्ली", "चाँद"], "thai": ["แมว", "สีแดง"],
    "emoji": ["😀", "🐈‍⬛", "👩🏽‍🚀", "🇯🇵"],
}


def captions(n: int, seed: int = 0) -> list[str]:
    """Captions mixing scripts, lengths (some past the context) and punctuation."""
    rng = random.Random(seed)
    words = [w for group in WORDS.values() for w in group]
    out = []
    while len(out) < n:
        text = " ".join(rng.choice(words) for _ in range(rng.choice([1, 2, 4, 8, 30])))
        out.append(text + rng.choice(["", ".", "!", " ?", ", 2024"]))
    return out


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """A tiny random BERT (WordPiece) and mT5 (SentencePiece Unigram), saved as a user's model folders are."""
    import sentencepiece as spm
    from tokenizers import BertWordPieceTokenizer

    root = tmp_path_factory.mktemp("hf")
    corpus = captions(3000, seed=1)
    bert = root / "bert"
    bert.mkdir()
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(corpus, vocab_size=600)
    wordpiece.save_model(str(bert))
    (bert / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    tokenizer = transformers.AutoTokenizer.from_pretrained(bert)  # from vocab.txt, as a model folder ships it
    tokenizer.save_pretrained(bert)
    torch.manual_seed(1234)  # not the trainer's seed: a random init (Lu) must not land on these weights
    transformers.BertModel(transformers.BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64)).save_pretrained(bert)
    mt5 = root / "mt5"
    mt5.mkdir()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(mt5 / "spiece"), vocab_size=400,
                                   hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    (mt5 / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 0}))
    tokenizer = transformers.AutoTokenizer.from_pretrained(mt5)  # converts the SentencePiece model
    tokenizer.save_pretrained(mt5)
    transformers.MT5Model(transformers.MT5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).save_pretrained(mt5)
    return {"bert": str(bert), "mt5": str(mt5)}


def sentencepiece_reference(folder: str, texts: list[str], ctx: int) -> torch.Tensor:
    """mT5's framing by the sentencepiece library itself: pieces, truncated to leave room for </s>, then pad 0."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=f"{folder}/spiece.model")
    rows = [(ids[: ctx - 1] + [1] + [0] * ctx)[:ctx] for ids in sp.encode(texts)]
    return torch.tensor(rows)


@pytest.mark.parametrize("kind", ["bert", "mt5"])
def test_a_models_own_tokenizer_gives_the_ids_of_transformers_and_of_an_independent_implementation(hf_models, kind):
    texts = captions(3000, seed=2)
    folder = hf_models[kind]
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    for ctx in (64, 12):  # 12: most of these captions are cut, their end token kept
        ours = hf_tokenizer(folder, ctx)(texts)
        expected = reference(texts, padding="max_length", truncation=True, max_length=ctx, return_tensors="pt").input_ids
        assert ours.dtype == torch.long and ours.shape == (len(texts), ctx)
        assert torch.equal(ours, expected)
        if kind == "bert":  # transformers' Python WordPiece, not the Rust one both of the above run
            legacy = transformers.models.bert.BertTokenizerLegacy(vocab_file=f"{folder}/vocab.txt")
            independent = legacy(texts, padding="max_length", truncation=True, max_length=ctx, return_tensors="pt").input_ids
        else:
            independent = sentencepiece_reference(folder, texts, ctx)
        assert torch.equal(ours, independent)
    assert (hf_tokenizer(folder, 64)(texts) != 0).sum(-1).max() > 12  # the cut above cut something


def test_a_unigram_tokenizer_fitted_here_reads_back_in_transformers_with_the_same_ids(tmp_path):
    texts = captions(2000, seed=3)
    tokenizer = train_unigram(texts, vocab_size=500, context_length=24)
    path = str(tmp_path / "unigram.json")
    tokenizer.save(path)
    loaded = Tokenizer.load(path, 24)
    assert loaded.framing == "native" and (loaded.pad_id, loaded.end_id) == (0, 1)
    reference = transformers.PreTrainedTokenizerFast(tokenizer_file=path, pad_token="<pad>")
    expected = reference(texts, padding="max_length", truncation=True, max_length=24, return_tensors="pt").input_ids
    assert torch.equal(loaded(texts), expected)
    for text in ["красный кот", "東京 ロケット", "लाल बिल्ली"]:  # non-Latin scripts round-trip
        assert loaded.decode(loaded([text])[0].tolist()) == text
    assert load_tokenizer(path, 24).fingerprint() == loaded.fingerprint() != tokenizer_for_other_context(path)


def tokenizer_for_other_context(path):
    return Tokenizer.load(path, 25).fingerprint()


TOWERS = {  # (tower section, what the setting promises of the language model's weights after training)
    "bert-LU": ({"hf_model": "bert", "lit": "LU"}, "start pretrained, trained"),
    "bert-Lu": ({"hf_model": "bert", "lit": "Lu"}, "start random, trained"),
    "bert-LL": ({"hf_model": "bert", "lit": "LL"}, "pretrained and unchanged"),
    "mt5-LU": ({"hf_model": "mt5", "lit": "LU", "hf_pooler": "mean_pooler", "hf_proj": "mlp"}, "start pretrained, trained"),
    "clip-unigram-Lu": ({}, "start random, trained"),
    "clip-bpe-Lu": ({}, "start random, trained"),  # a BPE fitted here: the export's open_clip tokenizer reads it
}


@pytest.mark.parametrize("kind", list(TOWERS))
def test_each_tower_kind_trains_exports_and_loads_in_plain_open_clip_with_equal_text_features(
        kind, hf_models, tiny_cache, tmp_path):
    section, promise = TOWERS[kind]
    tower = {"width": 32, "layers": 1, "heads": 2, "context_length": 16, **section}
    train_extra = {}
    if "hf_model" in tower:
        tower["hf_model"] = hf_models[tower["hf_model"]]
    else:  # a CLIP-style tower reading a vocabulary fitted here: SentencePiece-style (pools at </s>) or CLIP's BPE
        fit = train_bpe if "bpe" in kind else train_unigram
        fitted = fit(captions(500), vocab_size=800 if "bpe" in kind else 300, context_length=16)
        fitted.save(str(tmp_path / "fitted.json"))
        tower["vocab_size"] = fitted.vocab_size
        train_extra["tokenizer"] = str(tmp_path / "fitted.json")
    cfg = validate_config(config(tiny_cache, f"tower-{kind}", steps=3, tower=tower, **train_extra))
    assert cfg.train.tower.setting == kind.rsplit("-", 1)[1]
    start = build_run(cfg).tower.state_dict()
    summary = train(cfg)
    trained, tokenizer, meta = load_text_tower(summary.artifact)
    assert meta["lit"] == cfg.train.tower.setting
    if "hf_model" in tower:
        pretrained = transformers.AutoModel.from_pretrained(tower["hf_model"])
        if pretrained.config.is_encoder_decoder:  # open_clip keeps mT5's encoder
            pretrained = pretrained.encoder
        pretrained = pretrained.state_dict()
        initial = {k: start[f"text.transformer.{k}"] for k in pretrained}
        final = {k: trained.state_dict()[f"text.transformer.{k}"] for k in pretrained}
        same = lambda a, b: all(torch.equal(a[k], b[k]) for k in pretrained)  # noqa: E731
        assert same(initial, pretrained) == promise.startswith(("start pretrained", "pretrained"))
        assert same(final, initial) == (promise == "pretrained and unchanged")
        assert not torch.equal(trained.text.proj.state_dict()[next(iter(trained.text.proj.state_dict()))],
                               start[f"text.proj.{next(iter(trained.text.proj.state_dict()))}"])  # the projection trains
    elif "unigram" in kind:
        assert trained.text_cfg["pool_type"] == "eos" and trained.text_cfg["eos_id"] == tokenizer.end_id == 1

    folder = export_model(cfg, str(tmp_path / "export"))
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    model.eval()
    open_clip_tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    texts = ["a red cat!!", "красный кот 東京", "smiling face rocket " * 6, "Wow! &amp; café"]
    assert torch.equal(open_clip_tokenizer(texts), tokenizer(texts))
    if "bpe" in kind:  # not CLIP's stock ids: open_clip read the export's own merges
        assert not torch.equal(open_clip_tokenizer(texts), open_clip.tokenize(texts, 16))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokenizer(texts), normalize=True), trained(tokenizer(texts)))
        from_export, _, _ = load_text_tower(str(folder))  # eval and serve read the export too
        torch.testing.assert_close(from_export(tokenizer(texts)), trained(tokenizer(texts)))


def test_a_tower_section_that_names_two_sources_or_a_setting_without_weights_is_refused(tiny_cache):
    from litpipe.config import ConfigError

    with pytest.raises(ConfigError, match="hf_model .* and init .* both name a tower; keep one"):
        validate_config(config(tiny_cache, "bad", tower={"hf_model": "bert-base-uncased", "init": "ViT-B-32"}))
    with pytest.raises(ConfigError, match="lit: LL starts from pretrained weights; set train.tower.hf_model"):
        validate_config(config(tiny_cache, "bad", tower={"lit": "LL"}))


def test_an_unknown_language_model_architecture_names_what_open_clip_knows(tiny_cache, tmp_path):
    from litpipe.errors import UserError

    folder = tmp_path / "gpt2"
    transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100)).save_pretrained(folder)
    tower = validate_config(config(tiny_cache, "gpt2", tower={"hf_model": str(folder), "context_length": 16})).train.tower
    with pytest.raises(UserError, match="does not know `gpt2` models; it knows .*bert.*mt5"):
        build_text_tower(tower, 32)

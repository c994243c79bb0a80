"""The embedded OpenMoji demo dataset: a small real build (`limit`), read back with `webdataset`."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import emoji
import pytest
import webdataset as wds
from PIL import Image, ImageFont

from litpipe.config import load_config
from litpipe.files import content_digest
from litpipe.demo.data import (
    DONE_MARKER, IMAGE_SIZE, KINDS, DemoDataError, Emoji, _font, _groups, _sample, build_demo_data, caption_kind,
    is_heldout, load_emojis,
)
from litpipe.demo.tower import ARCHITECTURE, CHECKPOINT, MODEL
from litpipe.models.image_encoder import load_encoder

LIMIT, VIEWS = 40, 2


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("openmoji")
    summary = build_demo_data(out, limit=LIMIT, views=VIEWS)
    return out, summary


def read_split(out: Path, split: str) -> list[dict]:
    urls = [str(p) for p in sorted(out.glob(f"{split}-*.tar"))]
    return list(wds.WebDataset(urls, shardshuffle=False))


def test_shards_are_webdataset_samples_with_png_caption_metadata_and_label(demo):
    out, summary = demo
    classnames = (out / "classnames.txt").read_text().splitlines()
    samples = read_split(out, "train") + read_split(out, "heldout")
    assert len(samples) == summary["images"] == LIMIT * VIEWS
    assert len(list(out.glob("train-*.tar"))) > 1
    for sample in samples:
        assert {"__key__", "png", "txt", "json", "cls"} <= set(sample)
        meta = json.loads(sample["json"])
        image = Image.open(io.BytesIO(sample["png"]))
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (IMAGE_SIZE, IMAGE_SIZE))
        assert meta["key"] == sample["__key__"] and sample["txt"].decode() == meta["name"]
        assert int(sample["cls"]) == meta["label"]
        assert ("kind.cls" in sample) == (meta["kind"] is not None) == (caption_kind(meta["name"]) is not None)
        if "kind.cls" in sample:
            assert KINDS[int(sample["kind.cls"])] == meta["kind"]
        assert classnames[meta["label"]] == meta["group"].replace("&", "and").lower()
        assert {"emoji", "subgroup", "view", "font_size", "dx", "dy", "background"} <= set(meta)


def test_classnames_are_the_readable_unicode_groups_in_label_order(demo):
    out, _ = demo
    assert (out / "classnames.txt").read_text().splitlines() == [
        "smileys and emotion", "people and body", "animals and nature", "food and drink",
        "travel and places", "activities", "objects", "symbols", "flags",
    ]


def test_captions_are_the_emoji_package_names_as_plain_words(demo):
    out, _ = demo
    for sample in read_split(out, "train"):
        meta = json.loads(sample["json"])
        shortcode = emoji.EMOJI_DATA[meta["emoji"]]["en"]
        caption = sample["txt"].decode()
        assert "_" not in caption and not caption.startswith(":")
        assert caption.replace(":", "").replace(",", "").replace("“", "").replace("”", "") == (
            shortcode.strip(":").replace("_", " "))


def test_an_emojis_kind_is_the_one_kind_word_its_caption_uses():
    assert KINDS[caption_kind("woman astronaut: medium skin tone")] == "woman"
    assert KINDS[caption_kind("grinning face")] == "face"
    assert caption_kind("woman raising hand") is None  # two kinds: no label
    assert caption_kind("rocket") is None
    assert caption_kind("manual wheelchair") is None  # whole words only: `manual` is no `man`


def test_caption_keeps_the_unicode_qualifier_colon():
    captions = {e.char: e.caption for e in load_emojis(_groups())}
    assert captions["👩🏽‍🚀"] == "woman astronaut: medium skin tone"
    assert captions["😀"] == "grinning face"


def test_heldout_split_is_disjoint_by_emoji_and_keeps_every_view(demo):
    out, _ = demo
    train = {json.loads(s["json"])["emoji"] for s in read_split(out, "train")}
    heldout_views = [json.loads(s["json"]) for s in read_split(out, "heldout")]
    heldout = {m["emoji"] for m in heldout_views}
    assert heldout and train and not heldout & train
    assert sorted(m["view"] for m in heldout_views) == sorted(list(range(VIEWS)) * len(heldout))
    share = sum(map(is_heldout, (e.char for e in load_emojis(_groups())))) / len(load_emojis(_groups()))
    assert 0.10 < share < 0.15


def test_builds_in_two_processes_write_identical_bytes(demo, tmp_path):
    out, _ = demo
    code = f"from litpipe.demo.data import build_demo_data; build_demo_data({str(tmp_path)!r}, limit={LIMIT}, views={VIEWS})"
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True)
    names = sorted(p.name for p in out.iterdir())
    assert CHECKPOINT in names and names == sorted(p.name for p in tmp_path.iterdir())
    for name in names:
        assert (out / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_complete_build_is_reused_without_rewriting(demo):
    out, summary = demo
    shard = out / "train-000000.tar"
    before = shard.stat().st_mtime_ns
    assert build_demo_data(out, limit=LIMIT, views=VIEWS) == summary
    assert shard.stat().st_mtime_ns == before


def test_interrupted_build_is_redone_from_scratch(demo, tmp_path):
    out, _ = demo
    build_demo_data(tmp_path, limit=LIMIT, views=VIEWS)
    (tmp_path / DONE_MARKER).unlink()  # killed before the marker: shards may be partial
    (tmp_path / "train-000001.tar").write_bytes(b"partial")
    (tmp_path / ".train-000002.tar.tmp").write_bytes(b"partial")
    build_demo_data(tmp_path, limit=LIMIT, views=VIEWS)
    assert not (tmp_path / ".train-000002.tar.tmp").exists()
    assert (tmp_path / "train-000001.tar").read_bytes() == (out / "train-000001.tar").read_bytes()
    assert (tmp_path / DONE_MARKER).exists()


def test_other_parameters_rebuild_instead_of_reusing(demo, tmp_path):
    build_demo_data(tmp_path, limit=LIMIT, views=VIEWS)
    summary = build_demo_data(tmp_path, limit=LIMIT, views=1)
    assert len(read_split(tmp_path, "train")) + len(read_split(tmp_path, "heldout")) == summary["images"] == LIMIT


def test_licence_and_attribution_sit_next_to_the_data(demo):
    out, _ = demo
    assert "Attribution-ShareAlike 4.0" in (out / "LICENSE").read_text()
    assert ("All emojis designed by OpenMoji – the open-source emoji and icon project. License: CC BY-SA 4.0"
            in (out / "ATTRIBUTION.txt").read_text())


def test_glyphs_the_font_lacks_are_skipped_not_drawn_as_boxes():
    missing = Emoji("\U0010FFFD", "private use", "Symbols", "other-symbol", 7)
    unjoined = Emoji("😀\u200d😀", "two faces", "Smileys & Emotion", "face-smiling", 0)
    present = Emoji("😀", "grinning face", "Smileys & Emotion", "face-smiling", 0)
    font = _font()
    assert _sample(font, missing, 0, 0) is None
    assert _sample(font, unjoined, 0, 0) is None
    assert _sample(font, present, 0, 0) is not None


def test_zero_views_is_a_user_error(tmp_path):
    with pytest.raises(DemoDataError, match="views"):
        build_demo_data(tmp_path, views=0)


def test_without_raqm_sequences_are_skipped_and_single_emoji_kept():
    basic = _font(ImageFont.Layout.BASIC)
    astronaut = Emoji("👩🏽‍🚀", "woman astronaut: medium skin tone", "People & Body", "person-role", 1)
    grinning = Emoji("😀", "grinning face", "Smileys & Emotion", "face-smiling", 0)
    assert _sample(basic, astronaut, 0, 0) is None
    assert _sample(basic, grinning, 0, 0) is not None
    assert _sample(_font(), astronaut, 0, 0) is not None


def test_pretrained_tower_is_an_open_clip_checkpoint_that_encoder_pretrained_loads(demo):
    out, summary = demo
    cfg = load_config("pipeline.yaml", [f"encoder.pretrained={out / CHECKPOINT}"])
    assert (cfg.encoder.model, cfg.encoder.architecture) == (MODEL, ARCHITECTURE)  # pipeline.yaml says what was trained
    pretrained = load_encoder(cfg.encoder, device="cpu")
    random = load_encoder(cfg.encoder.model_copy(update={"pretrained": None}), device="cpu")
    assert pretrained.fingerprint["weights_sha256"] != random.fingerprint["weights_sha256"]
    assert pretrained.fingerprint["pretrained"] == content_digest(str(out / CHECKPOINT))
    assert summary["tower"]["images"] == summary["train_images"]  # pretrained on the training split alone


def test_a_missing_tower_is_rebuilt_alone_with_the_same_bytes(demo, tmp_path):
    out, summary = demo
    build_demo_data(tmp_path, limit=LIMIT, views=VIEWS)
    shard = tmp_path / "train-000000.tar"
    before = shard.stat().st_mtime_ns
    (tmp_path / CHECKPOINT).unlink()
    assert build_demo_data(tmp_path, limit=LIMIT, views=VIEWS)["tower"] == summary["tower"]
    assert shard.stat().st_mtime_ns == before
    assert (tmp_path / CHECKPOINT).read_bytes() == (out / CHECKPOINT).read_bytes()

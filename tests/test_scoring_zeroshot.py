"""litpipe/scoring/zeroshot.py: classifier construction, templates and class names, confusions."""

import pytest
import torch

from litpipe.scoring.zeroshot import (
    ZeroShotError,
    build_classifier,
    evaluate_zeroshot,
    load_classnames,
    load_templates,
)


def _fake_text_encoder(dim=8):
    """A deterministic text -> unit vector map, as the text tower gives."""
    def encode(texts):
        rows = []
        for text in texts:
            g = torch.Generator().manual_seed(sum(map(ord, text)) * 31 + len(text))
            rows.append(torch.randn(dim, generator=g, dtype=torch.float64))
        return torch.nn.functional.normalize(torch.stack(rows), dim=1).float()
    return encode


def test_classifier_is_the_renormalised_mean_of_the_template_embeddings():
    encode = _fake_text_encoder()
    classnames = ["cat", "red apple", "dog"]
    templates = load_templates(["a photo of a {c}.", "{c}", "a drawing of the {c}"])
    classifier = build_classifier(encode, classnames, templates)
    for row, name in zip(classifier, classnames):
        vectors = encode([f"a photo of a {name}.", name, f"a drawing of the {name}"]).double()
        mean = vectors.mean(0)
        assert torch.allclose(row.double(), mean / mean.norm(), atol=1e-6)


def test_openai_templates_are_open_clips_imagenet_templates():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    templates = load_templates("openai")
    assert len(templates) == len(OPENAI_IMAGENET_TEMPLATES) == 80
    assert [t("ox") for t in templates] == [t("ox") for t in OPENAI_IMAGENET_TEMPLATES]


def test_templates_and_classnames_load_from_files(tmp_path):
    (tmp_path / "t.txt").write_text("a {c}.\n\nitap of a {c}.\n")
    (tmp_path / "c.txt").write_text("apple\nred heart\n")
    assert [t("x") for t in load_templates(str(tmp_path / "t.txt"))] == ["a x.", "itap of a x."]
    assert load_classnames(str(tmp_path / "c.txt"), "heldout") == ["apple", "red heart"]


def test_a_template_without_the_class_placeholder_is_refused_with_the_fix():
    with pytest.raises(ZeroShotError, match=r"\{c\}"):
        load_templates(["a photo of a thing"])
    with pytest.raises(ZeroShotError, match="data.heldout.classnames"):
        load_classnames(None, "heldout")
    with pytest.raises(ZeroShotError, match="no such file"):
        load_classnames("/nonexistent/classnames.txt", "heldout")


def test_evaluate_zeroshot_normalises_images_and_lists_the_top_confusions():
    classifier = torch.eye(3)
    images = torch.tensor([[10.0, 0, 0], [0, 0.1, 0], [0, 5, 0], [0, 3, 0.1], [0, 0, 1]])
    labels = torch.tensor([0, 1, 2, 2, 2])  # two images of class 2 predicted as 1
    result = evaluate_zeroshot(images, labels, classifier, ["a", "b", "c"], ks=[1])
    assert result["metrics"]["acc1"] == pytest.approx(3 / 5)
    assert result["metrics"]["mean_per_class_recall"] == pytest.approx((1 + 1 + 1 / 3) / 3)
    assert result["top_confusions"] == [{"true": "c", "predicted": "b", "count": 2}]
    assert result["chance"]["acc1"] == pytest.approx(1 / 3)


def test_labels_beyond_the_class_names_are_refused():
    with pytest.raises(ZeroShotError, match="3 class names"):
        evaluate_zeroshot(torch.eye(4)[:, :3], torch.tensor([0, 1, 2, 3]), torch.eye(3), ["a", "b", "c"])


def test_rows_without_a_label_are_left_out_of_zero_shot():
    images = torch.tensor([[1.0, 0], [0, 1], [1, 0], [0, 1]])
    result = evaluate_zeroshot(images, torch.tensor([0, -1, 0, 1]), torch.eye(2), ["a", "b"], ks=[1])
    assert result["metrics"]["acc1"] == 1.0
    assert (result["num_samples"], result["num_unlabelled"]) == (3, 1)

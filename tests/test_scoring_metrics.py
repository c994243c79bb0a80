"""litpipe/scoring/metrics.py: CLIP_benchmark's definitions on hand-built cases, and against direct references."""

import itertools
import math

import pytest
import torch

from litpipe.scoring.metrics import (
    image_to_text_recall,
    mean_per_class_recall,
    retrieval_chance,
    text_to_image_recall,
    zeroshot_chance,
    zeroshot_metrics,
)


def test_zeroshot_top1_top5_and_mean_per_class_recall_on_a_hand_built_case():
    # 6 classes; class 5 never occurs in the targets but is predicted once.
    logits = torch.tensor([
        [9.0, 8, 7, 6, 5, 4],   # target 0: top-1 hit
        [9.0, 8, 7, 6, 5, 4],   # target 1: top-5 hit only
        [0.0, 9, 1, 2, 3, 4],   # target 1: top-1 hit
        [0.0, 1, 2, 3, 4, 9],   # target 0: predicted 5 (absent class), rank 6 -> miss
        [1.0, 2, 9, 0, 0, 0],   # target 2: hit
    ])
    targets = torch.tensor([0, 1, 1, 0, 2])
    got = zeroshot_metrics(logits, targets, ks=[1, 5])
    assert got["acc1"] == pytest.approx(3 / 5)
    assert got["acc5"] == pytest.approx(4 / 5)
    # balanced accuracy: class 0 recall 1/2, class 1 recall 1/2, class 2 recall 1; class 5 left out
    assert got["mean_per_class_recall"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)


def test_acc5_is_nan_with_fewer_than_five_classes_as_clip_benchmark_reports():
    got = zeroshot_metrics(torch.eye(3), torch.arange(3), ks=[1, 5])
    assert got["acc1"] == 1.0 and math.isnan(got["acc5"])


def test_tied_logits_go_to_the_lower_class_id_for_both_argmax_and_topk():
    logits = torch.tensor([[1.0, 1.0, 1.0], [0.0, 2.0, 2.0]])
    got = zeroshot_metrics(logits, torch.tensor([0, 2]), ks=[1, 2])
    assert got["acc1"] == 0.5  # row 0 predicts 0 (hit); row 1 predicts 1 (miss)
    assert got["acc2"] == 1.0
    assert got["mean_per_class_recall"] == pytest.approx((1 + 0) / 2)


def test_mean_per_class_recall_equals_balanced_accuracy_computed_from_a_confusion_matrix():
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 7, (400,), generator=generator)
    predictions = torch.where(torch.rand(400, generator=generator) < 0.6, targets,
                              torch.randint(0, 9, (400,), generator=generator))
    confusion = torch.zeros(9, 9, dtype=torch.float64)
    for t, p in zip(targets.tolist(), predictions.tolist()):
        confusion[t, p] += 1
    present = confusion.sum(1) > 0
    expected = (confusion.diag()[present] / confusion.sum(1)[present]).mean().item()
    assert mean_per_class_recall(predictions, targets, 9) == pytest.approx(expected, abs=1e-12)


def test_retrieval_recall_with_several_captions_per_image():
    # images 0, 1, 2; texts 0, 1 describe image 0, text 2 image 1, texts 3, 4 image 2
    text_image = torch.tensor([0, 0, 1, 2, 2])
    ranked_images = torch.tensor([[1, 0, 2], [0, 1, 2], [2, 0, 1], [2, 1, 0], [0, 1, 2]])
    t2i = text_to_image_recall(ranked_images, text_image, ks=[1, 2, 3])
    assert t2i == pytest.approx({"image_retrieval_recall@1": 2 / 5, "image_retrieval_recall@2": 3 / 5,
                                 "image_retrieval_recall@3": 1.0})
    ranked_texts = torch.tensor([[2, 1, 0], [3, 4, 0], [4, 0, 1]])  # image 0: second caption at rank 2
    i2t = image_to_text_recall(ranked_texts, text_image, ks=[1, 2])
    assert i2t == pytest.approx({"text_retrieval_recall@1": 1 / 3, "text_retrieval_recall@2": 2 / 3})


def test_padding_ids_from_an_approximate_index_never_count_as_hits():
    text_image = torch.tensor([0, 1, 1])
    i2t = image_to_text_recall(torch.tensor([[-1, -1], [-1, 2]]), text_image, ks=[1, 2])
    assert i2t == {"text_retrieval_recall@1": 0.0, "text_retrieval_recall@2": 0.5}


def test_retrieval_recall_matches_clip_benchmarks_positive_pair_matrix_formula():
    """An independent reference: CLIP_benchmark's dense one-hot recall, float64, recall > 0."""
    generator = torch.Generator().manual_seed(1)
    images = torch.nn.functional.normalize(torch.randn(40, 8, generator=generator, dtype=torch.float64), dim=1)
    text_image = torch.randint(0, 40, (90,), generator=generator)
    text_image[:40] = torch.arange(40)
    texts = torch.nn.functional.normalize(images[text_image] + torch.randn(90, 8, generator=generator, dtype=torch.float64), dim=1)
    scores = texts @ images.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(90), text_image] = True

    def reference(scores, positive, k):
        top = torch.topk(scores, k, dim=1).indices
        onehot = torch.nn.functional.one_hot(top, num_classes=scores.shape[1])
        true_positives = (onehot * positive.view(len(scores), 1, -1)).sum(dim=(1, 2))
        return ((true_positives / positive.sum(1)) > 0).double().mean().item()

    ranked_images = torch.argsort(scores, dim=1, descending=True)
    ranked_texts = torch.argsort(scores.T, dim=1, descending=True)
    for k in (1, 5, 10):
        assert text_to_image_recall(ranked_images, text_image, [k])[f"image_retrieval_recall@{k}"] == pytest.approx(reference(scores, positive, k))
        assert image_to_text_recall(ranked_texts, text_image, [k])[f"text_retrieval_recall@{k}"] == pytest.approx(reference(scores.T, positive.T, k))


def test_retrieval_chance_equals_the_average_over_every_possible_ranking():
    text_image = torch.tensor([0, 1, 1, 2, 2, 2])  # 1, 2 and 3 captions
    chance = retrieval_chance(text_image, num_images=3, ks=[1, 2, 4])
    for k in (1, 2, 4):
        orders = list(itertools.permutations(range(6)))
        i2t = sum(image_to_text_recall(torch.tensor([list(o)] * 3), text_image, [k])[f"text_retrieval_recall@{k}"]
                  for o in orders) / len(orders)
        assert chance[f"text_retrieval_recall@{k}"] == pytest.approx(i2t)
        image_orders = list(itertools.permutations(range(3)))
        t2i = sum(text_to_image_recall(torch.tensor([list(o)] * 6), text_image, [k])[f"image_retrieval_recall@{k}"]
                  for o in image_orders) / len(image_orders)
        assert chance[f"image_retrieval_recall@{k}"] == pytest.approx(t2i)


def test_random_text_features_score_near_the_analytic_chance_level():
    """The shuffled-caption control at the metric level: features unrelated to the images stay at chance."""
    generator = torch.Generator().manual_seed(2)
    num_images, num_classes = 2000, 20
    images = torch.randn(num_images, 16, generator=generator)
    texts = torch.randn(num_images, 16, generator=generator)  # one caption each, unrelated
    text_image = torch.arange(num_images)
    chance = retrieval_chance(text_image, num_images, [10])
    ranked = torch.topk(texts @ images.T, 10, dim=1).indices
    got = text_to_image_recall(ranked, text_image, [10])["image_retrieval_recall@10"]
    assert abs(got - chance["image_retrieval_recall@10"]) < 4 * math.sqrt(chance["image_retrieval_recall@10"] / num_images)
    labels = torch.randint(0, num_classes, (num_images,), generator=generator)
    logits = images @ torch.randn(num_classes, 16, generator=generator).T
    zs = zeroshot_metrics(logits, labels, ks=[1, 5])
    expected = zeroshot_chance(num_classes, [1, 5])
    assert abs(zs["acc1"] - expected["acc1"]) < 4 * math.sqrt(0.05 * 0.95 / num_images)
    assert abs(zs["acc5"] - expected["acc5"]) < 4 * math.sqrt(0.25 * 0.75 / num_images)

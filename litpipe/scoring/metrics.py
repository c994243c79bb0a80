"""Zero-shot and retrieval metrics, defined as LAION's CLIP_benchmark defines them, plus chance levels.

CLIP_benchmark (clip_benchmark/metrics/zeroshot_classification.py, zeroshot_retrieval.py):
- `acc{k}`: the fraction of samples whose true class is among the k highest logits; NaN when
  there are fewer than k classes (it reports `acc5 = nan` below 5 classes).
- `mean_per_class_recall`: sklearn's `balanced_accuracy_score(target, argmax)`: the mean, over
  the classes that occur in the targets, of the fraction of that class predicted correctly.
  Classes absent from the eval set are left out of the mean (even when predicted).
- `image_retrieval_recall@k` (text -> image) and `text_retrieval_recall@k` (image -> text): the
  fraction of queries with at least one correct item among the top k; an image with several
  captions is a hit when any of its captions is retrieved.

Where scores tie, CLIP_benchmark leaves the order to `torch.topk`; here the earlier index ranks
first (a stable sort), so results are reproducible and `argmax` agrees with top-1.
"""

from __future__ import annotations

import math

import torch


def ranked_classes(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest-scoring class ids per row, ties to the lower class id."""
    order = torch.sort(logits.double(), dim=1, descending=True, stable=True).indices
    return order[:, :k]


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, ks: list[int]) -> dict[str, float]:
    """`acc{k}` for every k: NaN when there are fewer than k classes, as CLIP_benchmark reports."""
    num_classes = logits.shape[1]
    usable = [k for k in ks if k <= num_classes]
    ranked = ranked_classes(logits, max(usable)) if usable else None
    out = {}
    for k in ks:
        if k > num_classes:
            out[f"acc{k}"] = math.nan
        else:
            out[f"acc{k}"] = (ranked[:, :k] == targets.view(-1, 1)).any(dim=1).double().mean().item()
    return out


def per_class_recall(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Recall of each class (float64); NaN for classes that never occur in the targets."""
    support = torch.bincount(targets, minlength=num_classes).double()
    correct = torch.bincount(targets[predictions == targets], minlength=num_classes).double()
    recall = correct / support
    recall[support == 0] = math.nan
    return recall


def mean_per_class_recall(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> float:
    """sklearn's balanced accuracy: mean recall over the classes present in the targets."""
    recall = per_class_recall(predictions, targets, num_classes)
    return recall[~recall.isnan()].mean().item()


def zeroshot_metrics(logits: torch.Tensor, targets: torch.Tensor, ks: list[int] = (1, 5)) -> dict[str, float]:
    """CLIP_benchmark's zero-shot numbers from [N, C] logits and [N] integer targets."""
    predictions = logits.argmax(dim=1)  # the first maximum: ranked_classes' top-1, without a second sort
    out = topk_accuracy(logits, targets, list(ks))
    out["mean_per_class_recall"] = mean_per_class_recall(predictions, targets, logits.shape[1])
    return out


def zeroshot_chance(num_classes: int, ks: list[int] = (1, 5)) -> dict[str, float]:
    """What a classifier that ranks classes at random scores in expectation."""
    out = {f"acc{k}": (k / num_classes if k <= num_classes else math.nan) for k in ks}
    out["mean_per_class_recall"] = 1 / num_classes
    return out


def text_to_image_recall(ranked_images: torch.Tensor, text_image: torch.Tensor, ks: list[int]) -> dict[str, float]:
    """`image_retrieval_recall@k`: a text query hits when its own image is in its top k.

    `ranked_images` [T, >=max(ks)] holds image ids by decreasing score; `text_image` [T] the image
    each text describes; -1 (no result) never hits.
    """
    hits = ranked_images == text_image.view(-1, 1)
    return {f"image_retrieval_recall@{k}": hits[:, :k].any(dim=1).double().mean().item() for k in ks}


def image_to_text_recall(ranked_texts: torch.Tensor, text_image: torch.Tensor, ks: list[int]) -> dict[str, float]:
    """`text_retrieval_recall@k`: an image query hits when any of its captions is in its top k.

    `ranked_texts` [I, >=max(ks)] holds text ids by decreasing score; `text_image` [T] the image
    each text describes.
    """
    images = torch.arange(ranked_texts.shape[0]).view(-1, 1)
    owner = torch.cat([text_image, text_image.new_tensor([-1])])  # id -1 (padding, no result) owns no image
    hits = owner[ranked_texts] == images
    return {f"text_retrieval_recall@{k}": hits[:, :k].any(dim=1).double().mean().item() for k in ks}


def retrieval_chance(text_image: torch.Tensor, num_images: int, ks: list[int]) -> dict[str, float]:
    """Expected recall@k of a random ranking, exactly (hypergeometric), for the same caption counts.

    Text -> image: one correct image among `num_images`, so min(k, I) / I. Image -> text: an
    image with c of the T captions misses only when all k drawn texts are others',
    C(T - c, k) / C(T, k).
    """
    num_texts = len(text_image)
    captions_per_image = torch.bincount(text_image, minlength=num_images).tolist()
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = min(k, num_images) / num_images
        kk = min(k, num_texts)
        miss = [_ratio_of_combinations(num_texts - c, num_texts, kk) for c in captions_per_image]
        out[f"text_retrieval_recall@{k}"] = 1 - sum(miss) / num_images
    return out


def _ratio_of_combinations(a: int, b: int, k: int) -> float:
    """C(a, k) / C(b, k) for a <= b, as a product so that huge galleries do not overflow."""
    if k > a:
        return 0.0
    return math.exp(sum(math.log(a - i) - math.log(b - i) for i in range(k)))

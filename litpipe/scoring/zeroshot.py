"""Zero-shot classification: a classifier built from class names and prompt templates, and its metrics.

As in CLIP (and open_clip / CLIP_benchmark): every template is filled with a class name and
embedded, the embeddings are L2-normalised, averaged, and the average renormalised; an image's
logits are its L2-normalised embedding against those class vectors.
"""

from __future__ import annotations

from typing import Callable

import fsspec
import torch
import torch.nn.functional as F

from litpipe.errors import UserError
from litpipe.scoring.metrics import zeroshot_chance, zeroshot_metrics

Template = Callable[[str], str]


class ZeroShotError(UserError):
    """Class names or templates that cannot be used."""


def load_templates(spec: str | list[str]) -> list[Template]:
    """`openai` (open_clip's OpenAI ImageNet templates), a file of templates one per line, or a list.

    Templates from a file or list mark the class name with `{c}`, e.g. `a photo of a {c}.`.
    """
    if spec == "openai":
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        return list(OPENAI_IMAGENET_TEMPLATES)
    lines = _read_lines(spec, "eval.zeroshot[].templates") if isinstance(spec, str) else list(spec)
    missing = [t for t in lines if "{c}" not in t]
    if not lines or missing:
        raise ZeroShotError(f"eval.zeroshot templates: {repr(missing[0]) + ' has' if missing else 'there are'} no `{{c}}` "
                            "placeholder for the class name; write templates like `a photo of a {c}.`")
    return [lambda c, t=t: t.replace("{c}", c) for t in lines]


def load_classnames(spec: str | list[str] | None, dataset_name: str) -> list[str]:
    """A dataset's `classnames`: a list, or a file (any fsspec URL) with one name per line."""
    if spec is None:
        raise ZeroShotError(f"data.{dataset_name}.classnames: required for zero-shot eval; give a list or a file "
                            "with one class name per line, in label order")
    return _read_lines(spec, f"data.{dataset_name}.classnames") if isinstance(spec, str) else list(spec)


def _read_lines(url: str, key: str) -> list[str]:
    try:
        with fsspec.open(url, "r", encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        raise ZeroShotError(f"{key}: {url}: no such file; give an existing file (one entry per line) or a list") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ZeroShotError(f"{key}: {url}: cannot be read as UTF-8 text ({err}); give a text file, one entry per line") from None


def build_classifier(encode_texts: Callable[[list[str]], torch.Tensor], classnames: list[str],
                     templates: list[Template]) -> torch.Tensor:
    """[C, D] class vectors: per class, the renormalised mean of its template embeddings (`encode_texts`
    gives unit vectors, as the text tower does)."""
    texts = [template(name) for name in classnames for template in templates]
    embeddings = encode_texts(texts).float()
    per_class = embeddings.view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1)


def classify(images: torch.Tensor, classifier: torch.Tensor, batch_rows: int = 65536) -> torch.Tensor:
    """[N, C] logits of L2-normalised image embeddings against the class vectors, in row batches."""
    return torch.cat([F.normalize(chunk.float(), dim=-1) @ classifier.T for chunk in images.split(batch_rows)])


def evaluate_zeroshot(images: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor, classnames: list[str],
                      ks: list[int] = (1, 5), top_confusions: int = 10) -> dict:
    """Metrics, their chance levels, and the most frequent (true, predicted) mistakes.

    Rows labelled -1 (the store's mark for a sample its shard gave no label) take no part: a labelled
    subset of a dataset, such as the demo's held-out emoji whose caption names a kind, is evaluated alone.
    """
    labels = labels.long()
    labelled = labels != -1
    images, labels = images[labelled], labels[labelled]
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(classnames)):
        raise ZeroShotError(f"labels range over {labels.min().item()}..{labels.max().item()} but there are "
                            f"{len(classnames)} class names; the classnames list must cover every label, in label order")
    logits = classify(images, classifier)
    predictions = logits.argmax(dim=1)  # first maximum, as metrics.ranked_classes breaks ties
    wrong = predictions != labels
    pairs, counts = torch.unique(labels[wrong] * len(classnames) + predictions[wrong], return_counts=True)
    top = torch.argsort(counts, descending=True, stable=True)[:top_confusions]
    confusions = [{"true": classnames[pairs[i] // len(classnames)], "predicted": classnames[pairs[i] % len(classnames)],
                   "count": int(counts[i])} for i in top.tolist()]
    return {
        "metrics": zeroshot_metrics(logits, labels, list(ks)),
        "chance": zeroshot_chance(len(classnames), list(ks)),
        "num_samples": len(labels),
        "num_unlabelled": int((~labelled).sum()),
        "num_classes": len(classnames),
        "num_classes_present": int(torch.unique(labels).numel()),
        "top_confusions": confusions,
    }

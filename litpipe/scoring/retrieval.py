"""Image-text retrieval recall@k in both directions, with a search index instead of a full score matrix."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from litpipe.scoring.metrics import image_to_text_recall, retrieval_chance, text_to_image_recall
from litpipe.scoring.search_index import build_index


def flatten_captions(captions: list[list[str]]) -> tuple[list[str], torch.Tensor]:
    """Every caption as one text, and the image each describes (CLIP_benchmark's texts_image_index)."""
    texts = [text for per_image in captions for text in per_image]
    text_image = torch.tensor([i for i, per_image in enumerate(captions) for _ in per_image], dtype=torch.long)
    return texts, text_image


def evaluate_retrieval(images: torch.Tensor, texts: torch.Tensor, text_image: torch.Tensor, ks: list[int],
                       index: str = "auto", **index_options) -> dict:
    """recall@k text -> image and image -> text by cosine, beside chance: the cached image vectors are
    normalised here, `texts` are the text tower's (unit) features.

    An image without captions counts as a miss for image -> text, as in CLIP_benchmark.
    """
    images = F.normalize(images.float(), dim=-1)
    texts = texts.float()
    k = max(ks)
    image_index = build_index(images, index, **index_options)
    _, ranked_images = image_index.search(texts, k)
    _, ranked_texts = build_index(texts, index, **index_options).search(images, k)
    return {
        "metrics": {**text_to_image_recall(ranked_images, text_image, ks), **image_to_text_recall(ranked_texts, text_image, ks)},
        "chance": retrieval_chance(text_image, len(images), ks),
        "num_images": len(images),
        "num_texts": len(texts),
        "index": image_index.kind,
    }

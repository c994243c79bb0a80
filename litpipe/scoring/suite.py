"""The eval sets of pipeline.yaml, loaded once and scored for any text tower.

The eval stage scores the trained tower with it; the trainer scores the tower as it trains
(`train.eval_every`), so both report the same numbers. Image vectors come from the caches (the image
tower never runs); only the texts (captions, prompts) go through the tower on each call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch

from litpipe.config import PipelineConfig
from litpipe.errors import UserError
from litpipe.scoring.retrieval import evaluate_retrieval, flatten_captions
from litpipe.scoring.search_index import require_faiss
from litpipe.scoring.text_features import encode_texts
from litpipe.scoring.zeroshot import build_classifier, evaluate_zeroshot, load_classnames, load_templates
from litpipe.store import EmbeddingCache, load_all, resolve_cache


@dataclass
class _RetrievalSet:
    cache: EmbeddingCache
    images: torch.Tensor
    texts: list[str]
    text_image: torch.Tensor


@dataclass
class _ZeroShotSet:
    cache: EmbeddingCache
    images: torch.Tensor
    labels: torch.Tensor
    classnames: list[str]
    templates_spec: str | list[str]
    templates: list
    ks: list[int]


class EvalSuite:
    """Every eval set of `cfg.eval` with its cached image vectors in memory."""

    def __init__(self, cfg: PipelineConfig):
        require_faiss()  # before any work, not at the first score
        self.cfg = cfg
        self.retrieval: dict[str, _RetrievalSet] = {}
        self.zeroshot: dict[str, _ZeroShotSet] = {}
        for name in cfg.eval.retrieval:
            cache = resolve_cache(cfg, name)
            contents = load_all(cache)
            self.retrieval[name] = _RetrievalSet(cache, contents.embeddings, *flatten_captions(contents.captions))
        for zeroshot in cfg.eval.zeroshot:
            name = zeroshot.dataset
            cache = resolve_cache(cfg, name)
            contents = load_all(cache, text=False)
            if contents.labels is None or bool((contents.labels == -1).all()):  # -1: a sample with no label
                raise UserError(f"eval.zeroshot: cache {cache.id} of `{name}` has no labels; give data.{name}.label_column "
                                "(or .cls files in the shards) and re-run `litpipe precompute`")
            self.zeroshot[name] = _ZeroShotSet(cache, contents.embeddings, contents.labels,
                                               load_classnames(cfg.data[name].classnames, name), zeroshot.templates,
                                               load_templates(zeroshot.templates), zeroshot.ks)

    def evaluate(self, tower: torch.nn.Module, tokenizer, device: str | torch.device = "cpu") -> dict:
        """{"retrieval": {name: result}, "zeroshot": {name: result}}, each result with metrics and chance."""
        e = self.cfg.eval
        encode = partial(encode_texts, tower, tokenizer, batch_size=e.text_batch_size, device=device)
        results = {"retrieval": {}, "zeroshot": {}}
        for name, s in self.retrieval.items():
            result = evaluate_retrieval(image_side(tower, s.images), encode(s.texts, desc=f"{name} captions"), s.text_image, e.ks, e.index,
                                        nlist=e.ivf_nlist, nprobe=e.ivf_nprobe)
            results["retrieval"][name] = {"cache_id": s.cache.id, **result}
        for name, s in self.zeroshot.items():
            classifier = build_classifier(partial(encode, desc=f"{name} prompts"), s.classnames, s.templates)
            result = evaluate_zeroshot(image_side(tower, s.images), s.labels, classifier, s.classnames, s.ks)
            results["zeroshot"][name] = {"cache_id": s.cache.id, "templates": s.templates_spec, **result}
        return results


@torch.inference_mode()
def image_side(tower: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The cached image vectors as the tower compares with them (`project_images`: through the trained
    image head of a head-only run, else as cached)."""
    return tower.project_images(images)


def flat_metrics(results: dict, field: str = "metrics") -> dict[str, float]:
    """`{task}/{dataset}/{metric}` -> value (`field`: metrics or chance), e.g. `zeroshot/heldout/acc1`, as
    `names.metric_names` lists them; undefined values (acc5 of fewer than 5 classes) left out."""
    return {f"{task}/{dataset}/{metric}": value for task in ("retrieval", "zeroshot")
            for dataset, result in results.get(task, {}).items() for metric, value in result[field].items()
            if not math.isnan(value)}

"""The pipeline's last stage: evaluate a text tower on every eval set of pipeline.yaml, from the caches.

Eval sets go through precompute like training data, so the image tower never runs here: image
embeddings come from the store, text features from the trained tower.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from litpipe.config import PipelineConfig
from litpipe.devices import resolve_device
from litpipe.errors import UserError
from litpipe.eval.defaults import chosen_checkpoint
from litpipe.eval.report import markdown_table, write_report
from litpipe.eval.retrieval import evaluate_retrieval, flatten_captions
from litpipe.eval.text_features import encode_texts
from litpipe.eval.zeroshot import build_classifier, evaluate_zeroshot, load_classnames, load_templates
from litpipe.store import load_all, resolve_cache
from litpipe.models.text_tower import load_text_tower


def evaluate(cfg: PipelineConfig, checkpoint: str | None = None) -> dict:
    """Every metric of every eval set, with the cache ids and checkpoint they came from."""
    url = chosen_checkpoint(cfg, checkpoint)
    device = resolve_device(cfg.eval.device, "eval.device")
    tower, tokenizer, meta = load_text_tower(url, device=str(device))
    encode = partial(encode_texts, tower, tokenizer, batch_size=cfg.eval.text_batch_size, device=device)
    results = {"checkpoint": url, "checkpoint_meta": meta, "encoder": cfg.encoder.model_dump(exclude={"device"}),
               "retrieval": {}, "zeroshot": {}}
    for name in cfg.eval.retrieval:
        cache = resolve_cache(cfg, name)
        contents = load_all(cache)
        texts, text_image = flatten_captions(contents.captions)
        result = evaluate_retrieval(contents.embeddings, encode(texts, desc=f"{name} captions"), text_image, cfg.eval.ks,
                                    cfg.eval.index, nlist=cfg.eval.ivf_nlist, nprobe=cfg.eval.ivf_nprobe)
        results["retrieval"][name] = {"cache_id": cache.id, **result}
    for zeroshot in cfg.eval.zeroshot:
        name = zeroshot.dataset
        cache = resolve_cache(cfg, name)
        contents = load_all(cache, text=False)
        if contents.labels is None or bool((contents.labels == -1).all()):
            raise UserError(f"eval.zeroshot: cache {cache.id} of `{name}` has no labels; give data.{name}.label_column "
                            "(or .cls files in the shards) and re-run `litpipe precompute`")
        classnames = load_classnames(cfg.data[name].classnames, name)
        classifier = build_classifier(partial(encode, desc=f"{name} prompts"), classnames, load_templates(zeroshot.templates))
        result = evaluate_zeroshot(contents.embeddings, contents.labels, classifier, classnames, zeroshot.ks)
        results["zeroshot"][name] = {"cache_id": cache.id, "templates": zeroshot.templates, **result}
    return results


def run(cfg: PipelineConfig, checkpoint: str | None = None) -> dict:
    """Evaluate, write eval.json / eval.md / eval.png under {workdir}/eval, print the table."""
    if not cfg.eval.retrieval and not cfg.eval.zeroshot:
        return {"skipped": "no eval sets in pipeline.yaml (eval.retrieval, eval.zeroshot)", "report": []}
    results = evaluate(cfg, checkpoint)
    paths = write_report(results, Path(cfg.workdir) / "eval")
    table = markdown_table(results)
    print("\n".join(["", f"== litpipe eval: {results['checkpoint']}", *table, f"(details: {paths['json']}, plot: {paths['png']})"]))
    flat = {f"{task}/{dataset}/{metric}": value
            for task in ("retrieval", "zeroshot") for dataset, r in results[task].items() for metric, value in r["metrics"].items()}
    return {"checkpoint": results["checkpoint"], "eval_json": str(paths["json"]), "plot": str(paths["png"]),
            "metrics": flat, "report": table}

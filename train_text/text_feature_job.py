"""Build the text-feature cache of an embedding cache: a Ray Data job runs the frozen text model once
over every caption, as the precompute job runs the image tower once over every image.

Each missing shard file is one item; a text-model actor (a GPU each where the cluster has GPUs, a
CPU otherwise) reads that file's captions, encodes them in `train.text_model.batch_size` batches in
row order, and publishes the shard's feature file by one atomic replace. The driver only counts. A
run killed at any point leaves whole files only; the next run encodes the missing ones, in the same
batches, so the cache ends bit-identical to an uninterrupted build. The model's fingerprint comes from
a Ray worker (the driver never holds a language model), and each actor checks its weights against it.
"""

from __future__ import annotations

import numpy as np
from litpipe.progress import progress

from litpipe.config import PipelineConfig, TextModelConfig
from litpipe.errors import UserError
from litpipe.models.text_model import FrozenTextModel
from litpipe.ray_cluster import init_ray
from litpipe.store import EmbeddingCache
from litpipe.store.text_features import TextFeatureCache


def ensure_text_features(cfg: PipelineConfig, cache: EmbeddingCache) -> TextFeatureCache:
    """The complete text-feature cache of `cache` under `cfg.train.text_model`, built where missing."""
    text_cfg = cfg.train.text_model
    ray = init_ray(cfg.ray)
    describe = ray.remote(num_cpus=1, max_calls=1)(_fingerprint)  # max_calls: the worker exits and frees the model
    features = TextFeatureCache(cache, ray.get(describe.remote(text_cfg)))
    todo = features.missing()
    if not todo and features.complete:
        return features
    if todo:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        items = [{"shard": record["name"]} for record in todo]
        stream = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _ShardEncoder, batch_size=1, fn_constructor_kwargs={"text_cfg": text_cfg, "cache_url": cache.url,
                                                                "fingerprint": features.fingerprint, "use_gpu": use_gpu},
            compute=ray.data.ActorPoolStrategy(size=text_cfg.actors), num_gpus=1 if use_gpu else 0)
        with progress(total=sum(r["rows"] for r in todo), unit="image", unit_scale=True,
                  desc=f"text features {cache.id} ({text_cfg.model})") as bar:
            for row in stream.iter_rows():
                bar.update(int(row["rows"]))
    features.finalize()
    return features


def _fingerprint(text_cfg: TextModelConfig) -> dict:
    return FrozenTextModel(text_cfg).fingerprint()


class _ShardEncoder:
    """A Ray Data actor: the frozen text model, loaded once, encoding one shard file per call."""

    def __init__(self, text_cfg: TextModelConfig, cache_url: str, fingerprint: dict, use_gpu: bool):
        self.model = FrozenTextModel(text_cfg, device="cuda" if use_gpu else "cpu")
        if self.model.fingerprint() != fingerprint:
            raise UserError(f"train.text_model.model {text_cfg.model}: this worker loaded other weights or another "
                            "tokenizer than the driver described; give every node the same model folder")
        self.features = TextFeatureCache(EmbeddingCache.open(cache_url), fingerprint)
        self.records = {r["name"]: r for r in self.features.cache.parts()}
        self.batch_size = text_cfg.batch_size

    def __call__(self, batch: dict) -> dict:
        rows = self.features.build(self.records[str(batch["shard"][0])], self._encode)
        return {"rows": np.array([rows])}

    def _encode(self, texts: list[str]) -> np.ndarray:
        """Every caption's feature, `batch_size` captions per forward, in order (the same batches on every run)."""
        batches = [self.model.encode(texts[a:a + self.batch_size]).numpy() for a in range(0, len(texts), self.batch_size)]
        return np.concatenate(batches) if batches else np.zeros((0, self.model.dim))

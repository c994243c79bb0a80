"""The text-feature cache: a frozen text model's feature for every caption of an embedding cache, kept
beside it per model (`{cache}/text_features/{id}`, `store.caption_rows`), so head-only training reads
both sides from disk and the text model runs once per caption, not once per step.

The id is keyed by the model's fingerprint (`litpipe.models.text_model.FrozenTextModel.fingerprint`):
its weights' bytes, tokenizer, pooling, max length and stored dtype.
"""

from __future__ import annotations

from litpipe.store.cache import EmbeddingCache
from litpipe.store.caption_rows import CaptionRows


class TextFeatureCache(CaptionRows):
    """One frozen text model's features of one embedding cache's captions."""

    folder, column, made_by = "text_features", "features", "text_model"

    def __init__(self, cache: EmbeddingCache, fingerprint: dict):
        super().__init__(cache, fingerprint, fingerprint["dtype"], int(fingerprint["dim"]))

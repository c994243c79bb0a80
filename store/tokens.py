"""The token cache: every caption of an embedding cache tokenised once, kept beside it per tokenizer.

Captions as Python strings, tokenised every step of every epoch, made the trainer's input path
4x slower than the vectors. A token cache holds each committed shard file's caption token ids,
int32 x context length per caption (`store.caption_rows`), under `{cache}/tokens/{tokenizer id}`.
The tokenizer's fingerprint covers its vocabulary and merges, special tokens, context length, and
the text cleaning that runs before it (open_clip's cleaning code and the ftfy it calls), so a
changed tokenizer, or a newer open_clip that cleans differently, never reads another's ids.
"""

from __future__ import annotations

import numpy as np

from litpipe.store.cache import EmbeddingCache
from litpipe.store.caption_rows import CaptionRows


class TokenCache(CaptionRows):
    """The token ids of one embedding cache's captions under one tokenizer."""

    folder, column, made_by = "tokens", "tokens", "tokenizer"

    def __init__(self, cache: EmbeddingCache, fingerprint: dict):
        super().__init__(cache, fingerprint, np.int32, int(fingerprint["context_length"]))

"""Build the token cache of an embedding cache for a tokenizer: every caption tokenised once.

Shard files are tokenised in parallel processes when there is much to do (open_clip's text
cleaning is Python; the BPE runs in Rust, batched), written one token file per shard file, and the
cache is marked complete at the end; a run that stopped half-way builds only what is missing.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from multiprocessing import get_context

from litpipe.progress import progress

from litpipe.models.tokenizer import Tokenizer
from litpipe.store import EmbeddingCache
from litpipe.store.tasks import bare
from litpipe.store.tokens import TokenCache

PARALLEL_ROWS = 200_000
_BUILDER: tuple[TokenCache, Tokenizer] | None = None  # a worker process's token cache and tokenizer, sent once


def ensure_token_cache(cache: EmbeddingCache, tokenizer: Tokenizer, workers: int | None = None) -> TokenCache:
    """The complete token cache of `cache` under `tokenizer`, built where missing."""
    tokens = TokenCache(cache, tokenizer.fingerprint())
    todo = tokens.missing()  # one listing: also finds shard files committed after an earlier build
    if not todo and tokens.complete:
        return tokens
    workers = workers or os.cpu_count() or 1
    parallel = workers > 1 and sum(r["rows"] for r in todo) > PARALLEL_ROWS  # else process start-up outweighs it
    # The cache (less its records) and the tokenizer go to each worker once; a job is one shard record.
    builder = (TokenCache(bare(cache), tokens.fingerprint), tokenizer)
    # spawn, not fork: the trainer's process may hold Ray's and torch's threads
    pool = (ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_start_builder, initargs=builder)
            if parallel else nullcontext())
    with pool, progress(total=sum(r["rows"] for r in todo), unit="image", unit_scale=True,
                        desc=f"tokenise {cache.id}") as bar:
        for rows in (pool.map(_tokenise_in_worker, todo) if parallel else (_tokenise(*builder, r) for r in todo)):
            bar.update(rows)
    tokens.finalize()
    return tokens


def _start_builder(tokens: TokenCache, tokenizer: Tokenizer) -> None:
    global _BUILDER
    _BUILDER = (tokens, tokenizer)


def _tokenise_in_worker(record: dict) -> int:
    return _tokenise(*_BUILDER, record)


def _tokenise(tokens: TokenCache, tokenizer: Tokenizer, record: dict) -> int:
    return tokens.build(record, lambda texts: tokenizer(texts).numpy())

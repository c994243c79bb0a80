"""Maximum inner-product search over a gallery of embeddings, for retrieval eval and `litpipe search`.

faiss does it when installed (exact `IndexFlatIP`, on a GPU when faiss's GPU build sees one, or
`IndexIVFFlat` for galleries too large for exact search); otherwise a chunked torch matmul + top-k
that holds one [query_chunk, gallery_chunk] block at a time, never a full similarity matrix.
Every index answers `search(queries, k) -> (scores [Q, k] float32, ids [Q, k] int64)`, best
first, padding with id -1 (score -inf) where fewer than k items exist.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import torch

from litpipe.errors import UserError

INDEX_KINDS = ("auto", "flat", "ivf", "torch")


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def build_index(gallery: torch.Tensor, kind: str = "auto", nlist: int | None = None, nprobe: int = 16,
                query_chunk: int = 1024, gallery_chunk: int = 16384):
    """An index over `gallery` [N, D]; `auto` is exact faiss when faiss is installed, else torch."""
    if kind not in INDEX_KINDS:
        raise ValueError(f"index kind {kind!r}: expected one of {', '.join(INDEX_KINDS)}")
    if kind == "auto":
        kind = "flat" if faiss_available() else "torch"
    if kind == "torch":
        return TorchIndex(gallery, query_chunk=query_chunk, gallery_chunk=gallery_chunk)
    return FaissIndex(gallery, ivf=kind == "ivf", nlist=nlist, nprobe=nprobe)


class FaissIndex:
    """faiss inner-product search; moved to GPU 0 when faiss's GPU build finds a GPU."""

    def __init__(self, gallery: torch.Tensor, ivf: bool = False, nlist: int | None = None, nprobe: int = 16):
        import faiss

        vectors = _as_faiss(gallery)
        num, dim = vectors.shape
        if ivf:
            nlist = nlist or default_nlist(num)
            if nlist > num:  # faiss's k-means needs a training point per list
                raise UserError(f"eval.ivf_nlist: {nlist} lists for {num} vectors; give at most {num}, "
                                "or leave it empty for about 4 sqrt(N)")
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(vectors)
            index.nprobe = min(nprobe, nlist)
            self.kind = f"faiss-ivf(nlist={nlist}, nprobe={index.nprobe})"
        else:
            index = faiss.IndexFlatIP(dim)
            self.kind = "faiss-flat"
        if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            self._gpu_resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)
            self.kind += "-gpu"
        index.add(vectors)
        self.index = index
        self.size = num

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        scores, ids = self.index.search(_as_faiss(queries), k)
        scores = torch.from_numpy(scores)
        ids = torch.from_numpy(ids).long()
        scores[ids < 0] = -math.inf
        return scores, ids


def default_nlist(num: int) -> int:
    """About 4 sqrt(N) lists, but at least 39 training points per list, as faiss asks."""
    return max(1, min(int(4 * math.sqrt(num)), num // 39))


def _as_faiss(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().cpu().float().numpy())


class TorchIndex:
    """Exact search by blocks of matmul + top-k; ties go to the lower gallery id."""

    kind = "torch"

    def __init__(self, gallery: torch.Tensor, query_chunk: int = 1024, gallery_chunk: int = 16384):
        self.gallery = gallery.detach().float()
        self.size = len(self.gallery)
        self.query_chunk = query_chunk
        self.gallery_chunk = gallery_chunk

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        queries = queries.detach().float().to(self.gallery.device)
        found = min(k, self.size)
        scores, ids = [], []
        for start in range(0, len(queries), self.query_chunk):
            s, i = self._search_chunk(queries[start:start + self.query_chunk], found)
            scores.append(s)
            ids.append(i)
        scores = torch.cat(scores) if scores else torch.empty(0, found)
        ids = torch.cat(ids) if ids else torch.empty(0, found, dtype=torch.long)
        pad = k - found
        if pad:
            scores = torch.cat([scores, torch.full((len(scores), pad), -math.inf)], dim=1)
            ids = torch.cat([ids, torch.full((len(ids), pad), -1, dtype=torch.long)], dim=1)
        return scores.cpu(), ids.cpu()

    def _search_chunk(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        best_scores = queries.new_empty(len(queries), 0)
        best_ids = torch.empty(len(queries), 0, dtype=torch.long, device=queries.device)
        for start in range(0, self.size, self.gallery_chunk):
            block = queries @ self.gallery[start:start + self.gallery_chunk].T
            scores, ids = _block_topk(block, min(k, block.shape[1]))
            best_scores, best_ids = _merge(best_scores, best_ids, scores, ids + start, k)
        return best_scores, best_ids


def _block_topk(block: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best columns of each row, equal scores at the cut going to the lower column."""
    kth = torch.topk(block, k, dim=1).values[:, -1:]
    above = block > kth
    room = k - above.sum(dim=1, keepdim=True)
    at_cut = block == kth
    chosen = above | (at_cut & (at_cut.cumsum(dim=1, dtype=torch.int32) <= room))
    ids = chosen.nonzero()[:, 1].view(len(block), k)  # row-major: each row's columns ascending
    return block.gather(1, ids), ids


def _merge(scores_a, ids_a, scores_b, ids_b, k):
    """The k best of two candidate lists, by score then lower id."""
    scores = torch.cat([scores_a, scores_b], dim=1)
    ids = torch.cat([ids_a, ids_b], dim=1)
    by_id = torch.argsort(ids, dim=1, stable=True)
    scores, ids = scores.gather(1, by_id), ids.gather(1, by_id)
    by_score = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, by_score), ids.gather(1, by_score)

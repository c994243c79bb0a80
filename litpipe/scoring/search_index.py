"""Maximum inner-product search over a gallery of embeddings, for retrieval eval and `litpipe search`.

faiss does it: exact `IndexFlatIP` (on a GPU when faiss's GPU build sees one), or `IndexIVFFlat`
for galleries too large for exact search. Every index answers `search(queries, k) -> (scores [Q, k] float32, ids [Q, k] int64)`, best
first, padding with id -1 (score -inf) where fewer than k items exist.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from litpipe.errors import UserError

INDEX_KINDS = ("auto", "flat", "ivf")


def require_faiss():
    """faiss, or the install line: it comes from an extra, `cpu` or `gpu`, because faiss-cpu and faiss-gpu
    both install the module `faiss` and must not sit side by side."""
    try:
        import faiss
    except ImportError:
        raise UserError("faiss is not installed: pip install 'litpipe[cpu]', or 'litpipe[gpu]' on a CUDA 12 machine "
                        "(one of the two: both install the module `faiss`)") from None
    return faiss


def build_index(gallery: torch.Tensor, kind: str = "auto", nlist: int | None = None, nprobe: int = 16) -> FaissIndex:
    """An index over `gallery` [N, D]; `auto` is the exact `flat` index."""
    if kind not in INDEX_KINDS:
        raise ValueError(f"index kind {kind!r}: expected one of {', '.join(INDEX_KINDS)}")
    return FaissIndex(gallery, ivf=kind == "ivf", nlist=nlist, nprobe=nprobe)


class FaissIndex:
    """faiss inner-product search; moved to GPU 0 when faiss's GPU build finds a GPU."""

    def __init__(self, gallery: torch.Tensor, ivf: bool = False, nlist: int | None = None, nprobe: int = 16):
        faiss = require_faiss()

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

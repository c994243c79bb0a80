"""Which images of one set near-duplicate an image of another: cosine >= threshold on cached vectors.

faiss's exact inner-product range search over L2-normalised float32 vectors (LiT's section 2.6 asks
it of the upstream set against the downstream ones); the reference in the tests is a float64 matrix
of every pair. Pairs within float32's rounding of the threshold may fall either way.
"""

from __future__ import annotations

import numpy as np
import torch

from .search_index import require_faiss


def near_duplicates(queries: torch.Tensor, gallery: torch.Tensor, threshold: float, chunk: int = 65_536) -> np.ndarray:
    """A bool per query row: some gallery row has cosine >= `threshold` with it."""
    faiss = require_faiss()
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(_unit(gallery))
    found = np.zeros(len(queries), dtype=bool)
    for start in range(0, len(queries), chunk):
        limits, _, _ = index.range_search(_unit(queries[start:start + chunk]), float(threshold))
        found[start:start + chunk] = np.diff(limits) > 0
    return found


def _unit(vectors: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(torch.nn.functional.normalize(vectors.float(), dim=-1).numpy(), dtype=np.float32)

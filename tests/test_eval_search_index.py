"""eval/search_index.py: faiss and chunked torch search agree, and chunking stays within its blocks."""

import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from litpipe.eval.search_index import build_index


def _unit(n, d, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=1)


def test_faiss_flat_and_chunked_torch_give_the_same_rankings_as_a_float64_reference():
    gallery, queries = _unit(1500, 24, 0), _unit(200, 24, 1)
    reference = torch.topk(queries.double() @ gallery.double().T, 10, dim=1)
    faiss_scores, faiss_ids = build_index(gallery, "flat").search(queries, 10)
    torch_scores, torch_ids = build_index(gallery, "torch", query_chunk=64, gallery_chunk=256).search(queries, 10)
    assert torch.equal(faiss_ids, reference.indices)
    assert torch.equal(torch_ids, reference.indices)
    assert torch.allclose(torch_scores.double(), reference.values, atol=1e-5)
    assert torch.allclose(faiss_scores.double(), reference.values, atol=1e-5)


def test_ivf_probing_every_list_finds_the_exact_neighbours():
    gallery, queries = _unit(2000, 16, 2), _unit(50, 16, 3)
    index = build_index(gallery, "ivf", nlist=8, nprobe=8)
    exact = build_index(gallery, "flat").search(queries, 5)[1]
    assert torch.equal(index.search(queries, 5)[1], exact)


def test_torch_search_breaks_ties_toward_the_lower_id_across_chunk_boundaries():
    gallery = torch.tensor([[0.0, 1.0]] * 2 + [[1.0, 0.0]] * 5 + [[0.0, 1.0]])  # ids 2..6 tie
    _, ids = build_index(gallery, "torch", query_chunk=1, gallery_chunk=3).search(torch.tensor([[1.0, 0.0]]), 4)
    assert ids.tolist() == [[2, 3, 4, 5]]


def test_asking_for_more_neighbours_than_the_gallery_holds_pads_with_minus_one():
    gallery = _unit(3, 4, 4)
    for kind in ("flat", "torch"):
        scores, ids = build_index(gallery, kind).search(gallery, 5)
        assert ids[:, 3:].eq(-1).all() and scores[:, 3:].eq(-math.inf).all()
        assert ids[:, 0].tolist() == [0, 1, 2]


def test_chunked_torch_search_never_allocates_a_full_similarity_matrix():
    n = 3000
    gallery, queries = _unit(n, 16, 5), _unit(n, 16, 6)
    index = build_index(gallery, "torch", query_chunk=256, gallery_chunk=512)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        index.search(queries, 10)
    largest = max(event.cpu_memory_usage for event in prof.events())
    assert largest <= 256 * 512 * 8  # one block of int64 at most
    assert largest < n * n * 4 / 10


def test_unknown_index_kind_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="auto, flat, ivf, torch"):
        build_index(_unit(3, 4, 0), "hnsw")

"""litpipe/scoring/search_index.py: faiss search against a float64 reference."""

import math
import sys

import pytest
import torch

from litpipe.scoring.search_index import build_index


def _unit(n, d, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=1)


def test_faiss_flat_gives_the_same_rankings_as_a_float64_reference():
    gallery, queries = _unit(1500, 24, 0), _unit(200, 24, 1)
    reference = torch.topk(queries.double() @ gallery.double().T, 10, dim=1)
    for kind in ("auto", "flat"):
        scores, ids = build_index(gallery, kind).search(queries, 10)
        assert torch.equal(ids, reference.indices)
        assert torch.allclose(scores.double(), reference.values, atol=1e-5)


def test_ivf_probing_every_list_finds_the_exact_neighbours():
    gallery, queries = _unit(2000, 16, 2), _unit(50, 16, 3)
    index = build_index(gallery, "ivf", nlist=8, nprobe=8)
    exact = build_index(gallery, "flat").search(queries, 5)[1]
    assert torch.equal(index.search(queries, 5)[1], exact)


def test_asking_for_more_neighbours_than_the_gallery_holds_pads_with_minus_one():
    gallery = _unit(3, 4, 4)
    scores, ids = build_index(gallery, "flat").search(gallery, 5)
    assert ids[:, 3:].eq(-1).all() and scores[:, 3:].eq(-math.inf).all()
    assert ids[:, 0].tolist() == [0, 1, 2]


def test_unknown_index_kind_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="auto, flat, ivf"):
        build_index(_unit(3, 4, 0), "hnsw")


def test_without_faiss_the_error_names_the_extra_to_install(monkeypatch):
    from litpipe.errors import UserError

    monkeypatch.setitem(sys.modules, "faiss", None)  # what `import faiss` meets where neither extra is installed
    with pytest.raises(UserError, match=r"pip install 'litpipe\[cpu\]', or 'litpipe\[gpu\]'"):
        build_index(torch.randn(4, 3))

"""Cache views: rows left out when reading, never rewritten; near-duplicates found as a float64 search finds them."""

import numpy as np
import pytest
import torch

from conftest import ROWS, raw_config, tiny_train_config
from litpipe.config import validate_config
from litpipe.scoring.near_duplicates import near_duplicates
from litpipe.store import StreamingReader, resolve_cache
from litpipe.store.views import CacheView


def test_near_duplicates_are_exactly_the_rows_a_float64_search_finds_at_or_above_the_threshold():
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(300, 24))
    queries = rng.normal(size=(2000, 24))
    copies = rng.choice(2000, 150, replace=False)  # near-duplicates: a gallery image, slightly changed
    queries[copies] = gallery[rng.integers(0, 300, 150)] + rng.normal(scale=rng.uniform(0.05, 0.6, (150, 1)), size=(150, 24))
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    cosines = unit(queries) @ unit(gallery).T  # float64, every pair
    threshold = 0.9
    assert np.abs(cosines - threshold).min() > 1e-5  # no pair within float32's rounding of it
    expected = (cosines >= threshold).any(axis=1)
    found = near_duplicates(torch.from_numpy(queries).float(), torch.from_numpy(gallery).float(), threshold, chunk=512)
    assert 30 < expected.sum() < 150 and np.array_equal(found, expected)


def test_a_view_leaves_its_keys_out_of_every_batch_and_the_run_records_it(tiny_cache, tmp_path):
    from litpipe.train_text.stage import run
    from litpipe.train_text.views import build_view

    cfg = validate_config(raw_config(tiny_cache["tmp"]))
    cache = resolve_cache(cfg, "train", None)
    (tmp_path / "out.txt").write_text("".join(f"k{i:04d}\n" for i in range(0, ROWS, 3)))
    raw = tiny_train_config(tiny_cache, "with-view", view={"name": "no-thirds", "exclude_keys": str(tmp_path / "out.txt")})
    view = build_view(validate_config(raw), cache)
    left_out = {f"k{i:04d}" for i in range(0, ROWS, 3)}
    assert view.excluded == left_out
    seen = [key for batch in StreamingReader(cache, 8, shuffle=False, view=view) for key in batch.keys]
    assert sorted(seen) == sorted(f"k{i:04d}" for i in range(ROWS) if i % 3)[:len(seen)] and not set(seen) & left_out
    assert len(seen) == (ROWS - len(left_out)) // 8 * 8
    summary = run(validate_config(raw))
    assert summary.view == view.fingerprint and summary.view["excluded"] == len(left_out)
    assert any("view no-thirds" in line for line in summary.report)
    with pytest.raises(Exception, match="no dataset `heldout` under data"):
        build_view(validate_config(tiny_train_config(tiny_cache, "v", view={"near_duplicates_of": ["heldout"]})), cache)


def test_a_view_with_no_keys_reads_what_no_view_reads(tiny_cache):
    cfg = validate_config(raw_config(tiny_cache["tmp"]))
    cache = resolve_cache(cfg, "train", None)
    plain = [batch.keys for batch in StreamingReader(cache, 16, seed=3)]
    empty = CacheView("none", frozenset(), {})
    assert [batch.keys for batch in StreamingReader(cache, 16, seed=3, view=empty)] == plain

"""The store's metadata requests grow linearly with a cache's parts: bench/metadata_scale.py's steps
(plan, finish, open, verify, cache ls, reader start, adopt) on the session's S3 protocol server, at
two sizes, counting the requests the client sends."""

import sys
from pathlib import Path

import fsspec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import metadata_scale  # noqa: E402


def test_metadata_requests_per_part_stay_flat_and_a_plan_finish_cycle_reads_each_record_once(s3_server, s3_root):
    fs = fsspec.filesystem("s3")
    requests = metadata_scale.Requests(fs)
    small, large = (metadata_scale.simulate(fs, f"{s3_root}/store-{n}", f"{s3_root}/data-{n}", n, requests)
                    for n in (20, 80))
    for step in small.keys() - {"parts"}:  # 4x the parts: at most 4x the requests (and a few more)
        assert large[step]["requests"] <= 4 * small[step]["requests"] + 8, (step, small[step], large[step])
    # Resuming lists commits/ and reads each record once; finishing reads them again only where new,
    # plus each part's key column (repeated keys across shards). Before: about 9 requests a part.
    cycle = large["plan (resume)"]["requests"] + large["finish (finalize)"]["requests"]
    assert cycle <= 3.5 * 80, (large["plan (resume)"], large["finish (finalize)"])

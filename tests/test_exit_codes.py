"""The `litpipe` process ends with the code its command meant, every time (`cli.leave`).

Before, Python's exit unwound threads still in native code: under load about one `cache verify` in
six printed "ok" and aborted (SIGABRT, exit 134), and one interrupted precompute in six printed
"interrupted" and segfaulted (exit -11). Each test runs the real command many times, side by side
with a second copy so the machine is as busy as where it was seen.
"""

import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import raw_config
from precompute_samples import image_bytes, sample_members, tiny_config, write_tar

LITPIPE = [sys.executable, "-m", "litpipe"]


def test_cache_verify_exits_0_after_ok_every_time(tiny_cache, tmp_path):
    from litpipe.store import list_caches

    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(raw_config(tiny_cache["tmp"])))
    cache_id = list_caches(str(tiny_cache["tmp"] / "store"))[0].id
    codes = []
    for _ in range(8):  # two at a time: 16 runs
        pair = [subprocess.Popen([*LITPIPE, "cache", "verify", cache_id, str(config)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(2)]
        for p in pair:
            out, err = p.communicate(timeout=120)
            codes.append(p.returncode)
            assert p.returncode == 0 and f"cache {cache_id}: ok" in out and "terminate" not in err, (p.returncode, err)
    assert codes == [0] * 16


def ray_processes() -> int:
    return int(subprocess.run(["pgrep", "-c", "-f", "raylet"], capture_output=True, text=True).stdout.strip() or 0)


@pytest.mark.long
def test_ctrl_c_during_precompute_exits_130_every_time_and_leaves_no_ray_behind(tmp_path):
    (tmp_path / "data").mkdir()
    for s in range(4):
        write_tar(tmp_path / "data" / f"part-{s}.tar",
                  [m for i in range(40) for m in sample_members(f"{s}/{i}", image_bytes(s * 100 + i, (64, 48)), f"c {i}")])
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(tiny_config({"train": {"format": "webdataset", "urls": "data/part-*.tar"}}, "store")))
    before = ray_processes()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # the load it was seen under
    try:
        for attempt in range(5):  # SIGINT at different points: Ray starting, the job running, its end
            p = subprocess.Popen([*LITPIPE, "precompute", str(config), "--set", f"store.root={tmp_path}/store-{attempt}"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
            time.sleep(6 + 1.5 * attempt)
            p.send_signal(signal.SIGINT)
            out, err = p.communicate(timeout=180)
            assert p.returncode == 130, (attempt, p.returncode, err[-2000:])
            assert "litpipe: interrupted" in err and "Traceback" not in err, err[-2000:]
            for _ in range(30):  # the local Ray it started is gone with it
                if ray_processes() <= before:
                    break
                time.sleep(0.5)
            assert ray_processes() <= before
    finally:
        busy.kill()

"""`litpipe serve`: the JSON API over real HTTP on loopback, and the page in headless Chromium.

The fixture is a real cache made through the store API (the tiny encoder over OpenMoji demo shards)
and a freshly initialised, saved text tower; the server runs in a thread, as `litpipe serve` runs it.
"""

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import uvicorn
import yaml
from conftest import TINY_ARCHITECTURE
from PIL import Image

from litpipe.store.commits import commit_part, finalize
from litpipe.cli import main
from litpipe.config import validate_config
from litpipe.demo.data import build_demo_data
from litpipe.serve.app import Explorer, create_app
from litpipe.scoring.zeroshot import build_classifier, classify, load_templates
from litpipe.store import EmbeddingCache
from litpipe.models.image_encoder import load_encoder
from litpipe.store.fingerprint import dataset_fingerprint
from litpipe.sources import list_shards, read_shard
from litpipe.models.text_tower import build_text_tower, save_text_tower
from litpipe.models.tokenizer import clip_tokenizer

DEMO_EMOJI, DEMO_VIEWS = 20, 2
def _raw_config(root: Path, data: Path) -> dict:
    return {
        "workdir": str(root / "run"),
        "data": {"demo": {"format": "webdataset", "urls": str(data / "train-*.tar"),
                          "classnames": str(data / "classnames.txt")}},
        "encoder": {"model": "litpipe-serve-tiny", "architecture": TINY_ARCHITECTURE, "device": "cpu"},
        "store": {"root": str(root / "store")},
        "train": {"dataset": "demo", "tower": {"width": 32, "layers": 1, "heads": 2, "context_length": 16}},
        "eval": {"device": "cpu"},
    }


def _config(root: Path, data: Path):
    return validate_config(_raw_config(root, data))


def _build_cache(cfg, encoder) -> EmbeddingCache:
    """Embed every sample of the dataset's shards (read by the store's one definition of samples) into a cache."""
    dataset = cfg.data["demo"]
    cache = EmbeddingCache.open_or_create(cfg.store.root, encoder.fingerprint, dataset_fingerprint(dataset))
    for url in list_shards(dataset):
        samples = read_shard(dataset, url)
        assert not [s.error for s in samples if s.error]
        if samples:
            pixels = torch.stack([encoder.preprocess(Image.open(io.BytesIO(s.image)).convert("RGB")) for s in samples])
            vectors = encoder.encode(pixels).numpy()
        else:
            vectors = np.zeros((0, encoder.dim), np.float32)
        commit_part(cache, url, pa.table({
            "key": [s.key for s in samples],
            "captions": [s.captions for s in samples],
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), pa.float32()), encoder.dim),
            "label": pa.array([s.label for s in samples], pa.int64()),
        }))
    finalize(cache)
    return cache


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _running(app):
    """uvicorn serving `app` on a free loopback port, in a thread; yields the base URL."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def _serve(cfg) -> Explorer:
    return Explorer.load(cfg, "demo", f"{cfg.workdir}/train/final")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    build_demo_data(root / "openmoji", limit=DEMO_EMOJI, views=DEMO_VIEWS)
    cfg = _config(root, root / "openmoji")
    encoder = load_encoder(cfg.encoder, "cpu")
    cache = _build_cache(cfg, encoder)
    torch.manual_seed(0)
    save_text_tower(f"{cfg.workdir}/train/final", build_text_tower(cfg.train.tower, embed_dim=encoder.dim), clip_tokenizer(16))
    (root / "pipeline.yaml").write_text(yaml.safe_dump(_raw_config(root, root / "openmoji")))
    return {"root": root, "cfg": cfg, "encoder": encoder, "cache": cache}


@pytest.fixture(scope="module")
def server(built):
    explorer = _serve(built["cfg"])
    with _running(create_app(explorer)) as url:
        yield {**built, "url": url, "explorer": explorer}


def _get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers.get("Content-Type", "")


def _json(url: str, body: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        assert err.headers.get("Content-Type") == "application/json"
        return err.code, json.loads(err.read())


def _search(server, query: str, k: int = 12) -> tuple[int, dict]:
    return _json(f"{server['url']}/api/search?" + urllib.parse.urlencode({"q": query, "k": k}))


# --- the API ---------------------------------------------------------------------------------


def test_the_api_is_described_offline_and_no_page_loads_scripts_from_a_cdn(server):
    status, described = _json(f"{server['url']}/openapi.json")
    assert status == 200 and "/api/search" in described["paths"]
    for page in ("docs", "redoc"):
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{server['url']}/{page}", timeout=30)
        assert missing.value.code == 404


def test_info_names_the_cache_dataset_and_classnames(server):
    status, info = _json(f"{server['url']}/api/info")
    assert status == 200
    assert info["cache_id"] == server["cache"].id
    assert info["num_images"] == server["cache"].num_rows == DEMO_EMOJI * DEMO_VIEWS
    assert info["classnames"][0] == "smileys and emotion" and info["has_labels"]
    assert info["images_problem"] is None


def test_search_returns_the_index_ranking_of_the_text_tower_query(server):
    status, body = _search(server, "a red heart", k=5)
    assert status == 200
    engine = server["explorer"].engine
    scores, ids = engine.index.search(server["explorer"].encode(["a red heart"]), 5)
    assert [h["key"] for h in body["hits"]] == [engine.contents.keys[i] for i in ids[0].tolist()]
    assert [h["score"] for h in body["hits"]] == pytest.approx(scores[0].tolist(), abs=1e-5)
    assert [h["rank"] for h in body["hits"]] == [1, 2, 3, 4, 5]
    assert all(h["captions"] and h["label"] in server["explorer"].classnames for h in body["hits"])


def test_k_larger_than_the_cache_returns_every_image_once(server):
    status, body = _search(server, "anything", k=100)
    assert status == 200
    assert sorted(h["key"] for h in body["hits"]) == sorted(server["explorer"].engine.contents.keys)


def test_image_endpoint_serves_the_source_png_bytes_of_a_key(server):
    key = server["explorer"].engine.contents.keys[3]
    status, data, content_type = _get(f"{server['url']}/api/image/{urllib.parse.quote(key, safe='')}")
    assert status == 200 and content_type == "image/png"
    shard = server["explorer"].engine.fetcher.input_of(key)
    with tarfile.open(shard) as tar:
        assert data == tar.extractfile(f"{key}.png").read()
    assert Image.open(io.BytesIO(data)).size == (112, 112)


def test_zeroshot_assigns_every_image_to_exactly_one_class(server):
    status, body = _json(f"{server['url']}/api/zeroshot",
                         {"classes": ["a cat", "", " a heart ", "a flag"], "templates": ["a photo of {c}.", "{c}"], "per_class": 3})
    assert status == 200
    assert [c["name"] for c in body["classes"]] == ["a cat", "a heart", "a flag"]
    assert sum(c["count"] for c in body["classes"]) == body["total"] == DEMO_EMOJI * DEMO_VIEWS
    assert body["num_templates"] == 2
    for c in body["classes"]:
        assert len(c["images"]) == min(3, c["count"])
        assert [i["score"] for i in c["images"]] == sorted((i["score"] for i in c["images"]), reverse=True)
    assert body["accuracy"] is None  # none of these names is a class of the dataset


def test_zeroshot_with_the_dataset_classes_matches_evals_classifier_and_labels(server):
    explorer = server["explorer"]
    classnames, contents = explorer.classnames, explorer.engine.contents
    status, body = _json(f"{server['url']}/api/zeroshot", {"classes": classnames})
    assert status == 200 and body["num_templates"] == 80  # OpenAI's ImageNet templates by default
    predicted = classify(contents.embeddings, build_classifier(explorer.encode, classnames, load_templates("openai"))).argmax(1)
    assert [c["count"] for c in body["classes"]] == predicted.bincount(minlength=len(classnames)).tolist()
    row = {key: i for i, key in enumerate(contents.keys)}
    assert all(predicted[row[image["key"]]] == c for c, cls in enumerate(body["classes"]) for image in cls["images"])
    assert body["accuracy"]["over"] == len(contents.labels)
    assert body["accuracy"]["value"] == pytest.approx((predicted == contents.labels).float().mean().item())


@pytest.mark.parametrize("query", ["", "   "])
def test_empty_query_is_a_400_naming_it(server, query):
    status, body = _search(server, query)
    assert status == 400 and "query is empty" in body["error"]


def test_k_out_of_range_and_missing_query_are_422_naming_the_parameter(server):
    status, body = _search(server, "cat", k=0)
    assert status == 422 and body["error"].startswith("k:")
    status, body = _json(f"{server['url']}/api/search")
    assert status == 422 and body["error"].startswith("q:")


@pytest.mark.parametrize("classes, problem", [
    (["cat"], "at least two class names"),
    (["cat", "  ", ""], "at least two class names"),
    (["cat", "dog", "cat"], "'cat' is listed twice"),
])
def test_bad_class_lists_are_400_naming_the_problem(server, classes, problem):
    status, body = _json(f"{server['url']}/api/zeroshot", {"classes": classes})
    assert status == 400 and problem in body["error"]


def test_a_template_without_the_class_placeholder_is_a_400(server):
    status, body = _json(f"{server['url']}/api/zeroshot", {"classes": ["cat", "dog"], "templates": ["a photo"]})
    assert status == 400 and "{c}" in body["error"]


def test_malformed_zeroshot_body_is_a_422(server):
    status, body = _json(f"{server['url']}/api/zeroshot", {"classes": "cat"})
    assert status == 422 and body["error"].startswith("classes:")


def test_unknown_key_is_a_404_naming_the_key(server):
    status, data, content_type = _get(f"{server['url']}/api/image/no-such-key")
    assert status == 404 and content_type == "application/json"
    assert "'no-such-key' is not in cache" in json.loads(data)["error"]


def test_concurrent_requests_get_the_same_answers_as_sequential_ones(server):
    queries = ["cat", "a red heart", "flag of france", "smiling face", "tree", "rocket"] * 3
    expected = {q: _search(server, q, 5)[1]["hits"] for q in set(queries)}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda q: _search(server, q, 5), queries))
    assert all(status == 200 for status, _ in answers)
    assert [body["hits"] for _, body in answers] == [expected[q] for q in queries]


def test_a_burst_of_requests_is_answered_in_full(server):
    queries = [f"{colour} {thing}" for colour in ("red", "blue", "green", "yellow", "black")
               for thing in ("cat", "heart", "flag", "face", "tree", "star", "moon", "rocket")]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda q: _search(server, q, 3), queries))
    assert [status for status, _ in answers] == [200] * len(queries)
    assert all(len(body["hits"]) == 3 for _, body in answers)


def test_litpipe_serve_prints_the_url_and_serves_until_interrupted(built):
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "litpipe.cli", "serve", str(built["root"] / "pipeline.yaml"),
                                "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        while "http://" not in line:
            line = process.stdout.readline()
            assert line or process.poll() is None, "litpipe serve exited before serving"
        assert f"http://127.0.0.1:{port}" in line and f"{DEMO_EMOJI * DEMO_VIEWS} images of `demo`" in line
        deadline = time.monotonic() + 20
        while True:
            try:
                status, info = _json(f"http://127.0.0.1:{port}/api/info")
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline, "no answer from litpipe serve"
                time.sleep(0.1)
        assert status == 200 and info["cache_id"] == built["cache"].id
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(20) == 0


def test_a_taken_port_fails_before_loading_anything_and_names_the_fix(built, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(built["root"] / "pipeline.yaml"), "--port", str(port)]) == 2
    assert f"--port {port}: cannot listen there" in capsys.readouterr().err


def test_an_unknown_dataset_is_named_with_the_known_ones(built, capsys):
    assert main(["serve", str(built["root"] / "pipeline.yaml"), "--dataset", "nope"]) == 2
    assert "--dataset nope: no such `data` entry" in capsys.readouterr().err


def test_a_cache_whose_source_images_are_gone_still_searches_and_answers_404_per_image(built, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(built["root"] / "openmoji", moved)
    cfg = _config(tmp_path, moved)
    cache = _build_cache(cfg, built["encoder"])
    for tar in moved.glob("train-*.tar"):
        tar.unlink()
    explorer = Explorer.load(cfg, "demo", f"{built['cfg'].workdir}/train/final", cache=cache.id)
    with _running(create_app(explorer)) as url:
        status, info = _json(f"{url}/api/info")
        assert info["cache_id"] == cache.id and "source images of cache" in info["images_problem"]
        status, body = _json(f"{url}/api/search?q=cat&k=3")
        assert status == 200 and len(body["hits"]) == 3
        key = urllib.parse.quote(body["hits"][0]["key"], safe="")
        status, data, content_type = _get(f"{url}/api/image/{key}")
        assert status == 404 and content_type == "application/json"
        assert "not reachable" in json.loads(data)["error"] and "train-0000" in json.loads(data)["error"]


# --- the page in a real browser --------------------------------------------------------------


@pytest.fixture
def browser(tmp_path):
    """Headless Debian Chromium through chromedriver (selenium); skipped where they are not installed."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    binary, driver = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not (os.path.exists(binary) and os.path.exists(driver)):
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1000", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    chrome = webdriver.Chrome(options=options, service=Service(driver))
    yield chrome
    chrome.quit()


def _wait(chrome, condition, timeout: float = 20.0, what: str = "the page"):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(chrome, timeout).until(lambda d: condition(d), message=f"timed out waiting for {what}")


def test_page_searches_by_text_and_sorts_the_cache_into_typed_classes(server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(server["url"] + "/")
    _wait(browser, lambda d: "images of" in d.find_element(By.ID, "info").text, what="/api/info")

    browser.find_element(By.ID, "query").send_keys("a smiling face")
    browser.find_element(By.ID, "search-button").click()
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results figure img")) == 12, what="12 results")
    _wait(browser, lambda d: d.execute_script(
        "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"),
        what="every result image to load")
    assert "12 images for" in browser.find_element(By.ID, "search-status").text
    browser.save_screenshot(str(tmp_path / "search.png"))

    browser.find_element(By.CSS_SELECTOR, "nav button[data-tab=zeroshot]").click()
    browser.find_element(By.ID, "classes").send_keys("smileys and emotion\nanimals and nature\nflags")
    browser.find_element(By.ID, "templates").send_keys("an emoji of {c}.\na picture of {c}")
    browser.find_element(By.ID, "classify-button").click()
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "[data-count]")) == 3, what="three classes")
    counts = [int(e.get_attribute("data-count")) for e in browser.find_elements(By.CSS_SELECTOR, "[data-count]")]
    assert sum(counts) == server["cache"].num_rows
    assert int(browser.find_element(By.ID, "total").get_attribute("data-total")) == server["cache"].num_rows
    assert "accuracy" in browser.find_element(By.ID, "summary").text
    _wait(browser, lambda d: d.execute_script(
        "return [...document.querySelectorAll('#classes-out img')].every(i => i.complete && i.naturalWidth > 0)"),
        what="every class image to load")
    browser.save_screenshot(str(tmp_path / "zeroshot.png"))
    assert (tmp_path / "zeroshot.png").stat().st_size > 10_000

    browser.find_element(By.ID, "classes").clear()
    browser.find_element(By.ID, "classes").send_keys("only one")
    browser.find_element(By.ID, "classify-button").click()
    _wait(browser, lambda d: d.find_element(By.ID, "zeroshot-error").is_displayed(), what="the error")
    assert "at least two class names" in browser.find_element(By.ID, "zeroshot-error").text

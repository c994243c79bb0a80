"""The web app behind `litpipe serve`: search a cache by text and sort it with a zero-shot classifier.

Everything heavy loads once, in `Explorer.load`: the cache's vectors, the search index, the text
tower (eval's `CacheSearch`) and the key -> source shard map. A request then runs the text tower once
and reads the in-memory index, so answers take milliseconds; FastAPI runs these sync handlers in its
thread pool, so requests are served concurrently. The page is one static file, static/index.html.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from functools import partial
from importlib.resources import files

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from litpipe.config import PipelineConfig
from litpipe.errors import UserError
from litpipe.serve.image_source import ImageSourceError
from litpipe.serve.search import CacheSearch, image_mime
from litpipe.scoring.text_features import encode_texts
from litpipe.scoring.zeroshot import build_classifier, classify, load_classnames, load_templates

MAX_K = 500
IMAGE_CACHE_SIZE = 1024  # thumbnails kept in memory: a page of results is fetched from its shards once


class ZeroShotRequest(BaseModel):
    classes: list[str] = Field(description="class names; blank entries are ignored")
    templates: list[str] | None = Field(None, description="prompts with `{c}` for the class name; none = OpenAI's")
    per_class: int = Field(8, ge=1, le=100, description="top images shown per class")


class Explorer:
    """One cache and one text tower, queried by text; safe to share between request threads."""

    def __init__(self, search: CacheSearch, dataset: str, checkpoint: str, classnames: list[str] | None):
        self.engine = search
        self.dataset = dataset
        self.checkpoint = checkpoint
        self.classnames = classnames
        self.encode = partial(encode_texts, search.tower, search.tokenizer)
        self.row_of = {key: i for i, key in enumerate(search.contents.keys)}
        self._images: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.images_problem = self._check_images()

    @classmethod
    def load(cls, cfg: PipelineConfig, dataset: str, checkpoint: str, cache: str | None = None) -> Explorer:
        spec = cfg.data[dataset].classnames
        return cls(CacheSearch(cfg, dataset, checkpoint, cache), dataset, checkpoint,
                   load_classnames(spec, dataset) if spec is not None else None)

    def _check_images(self) -> str | None:
        """Why the source images cannot be shown, or None; fetching one also builds the key map up front."""
        keys = self.engine.contents.keys
        if not keys:
            return None
        try:
            if self.engine.fetcher.fetch(keys[:1]):
                return None
            where = f"{self.engine.fetcher.input_of(keys[0])} has no image for {keys[0]!r} (missing, moved or unreadable)"
        except UserError as err:  # the cache's own shards cannot be read
            where = str(err)
        return f"the source images of cache {self.engine.cache.id} are not reachable: {where}"

    def info(self) -> dict:
        cache, contents = self.engine.cache, self.engine.contents
        return {"dataset": self.dataset, "cache_id": cache.id, "num_images": len(contents.keys),
                "checkpoint": self.checkpoint, "index": self.engine.index.kind,
                "classnames": self.classnames, "has_labels": contents.labels is not None,
                "images_problem": self.images_problem}

    def search(self, query: str, k: int) -> list[dict]:
        if not query.strip():
            raise UserError("query is empty; type what to look for, e.g. `a red heart`")
        hits = self.engine.search(query, k)
        self._prefetch([h["key"] for h in hits])
        return [{**h, "label": self._label_name(self.row_of[h["key"]])} for h in hits]

    def zeroshot(self, request: ZeroShotRequest) -> dict:
        names = [c.strip() for c in request.classes if c.strip()]
        if len(names) < 2:
            raise UserError(f"a classifier needs at least two class names, one per line; got {len(names)}"
                            + (f" ({names[0]!r})" if names else ""))
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise UserError(f"class {duplicates[0]!r} is listed twice; give each class once")
        templates = load_templates([t.strip() for t in request.templates if t.strip()] if request.templates else "openai")
        contents = self.engine.contents
        scores, assigned = classify(contents.embeddings, build_classifier(self.encode, names, templates)).max(dim=1)
        order = scores.argsort(descending=True)
        order = order[assigned[order].argsort(stable=True)]  # grouped by class, best first within each
        counts = assigned.bincount(minlength=len(names)).tolist()
        starts = [0, *itertools.accumulate(counts)]
        classes = []
        for c, name in enumerate(names):
            best = order[starts[c]:starts[c] + min(counts[c], request.per_class)].tolist()
            classes.append({"name": name, "count": counts[c], "images": [
                {"key": contents.keys[i], "score": float(scores[i]), "captions": contents.captions[i],
                 "label": self._label_name(i)} for i in best]})
        self._prefetch([image["key"] for c in classes for image in c["images"]])
        return {"classes": classes, "total": len(contents.keys), "num_templates": len(templates),
                "accuracy": self._accuracy(names, assigned)}

    def _accuracy(self, names: list[str], assigned: torch.Tensor) -> dict | None:
        """Top-1 accuracy over the labelled images whose true class name is one of `names`."""
        labels = self.engine.contents.labels
        if labels is None or not self.classnames:
            return None
        typed = {n.lower(): c for c, n in enumerate(names)}
        lookup = torch.tensor([typed.get(n.lower(), -1) for n in self.classnames] + [-1])  # label -> typed class
        in_range = (labels >= 0) & (labels < len(self.classnames))
        target = lookup[torch.where(in_range, labels, len(self.classnames))]
        scored = target >= 0
        if not scored.any():
            return None
        return {"value": (assigned[scored] == target[scored]).float().mean().item(), "over": int(scored.sum())}

    def _label_name(self, row: int) -> str | None:
        labels = self.engine.contents.labels
        if labels is None or not self.classnames:
            return None
        label = int(labels[row])
        return self.classnames[label] if 0 <= label < len(self.classnames) else None

    def image(self, key: str) -> bytes:
        if key not in self.row_of:
            raise ImageSourceError(f"key {key!r} is not in cache {self.engine.cache.id}; use a key that search returned")
        with self._lock:
            if key in self._images:
                self._images.move_to_end(key)
                return self._images[key]
        if self.images_problem:
            raise ImageSourceError(self.images_problem)
        data = self.engine.fetcher.fetch([key]).get(key)
        if data is None:
            raise ImageSourceError(f"the image of {key!r} cannot be read from its source shard "
                                   f"{self.engine.fetcher.input_of(key)} (missing, moved or unreadable)")
        self._remember({key: data})
        return data

    def _prefetch(self, keys: list[str]) -> None:
        """Read the images of a result page in one pass per source shard, before the page asks for them."""
        with self._lock:
            missing = [k for k in dict.fromkeys(keys) if k not in self._images]
        if missing and not self.images_problem:
            self._remember(self.engine.fetcher.fetch(missing))

    def _remember(self, images: dict[str, bytes]) -> None:
        with self._lock:
            self._images.update(images)
            while len(self._images) > IMAGE_CACHE_SIZE:
                self._images.popitem(last=False)


def create_app(explorer: Explorer) -> FastAPI:
    """The JSON API (described at /openapi.json) and the page at /. FastAPI's /docs and /redoc pages load
    their scripts from a CDN and are blank offline, so they are left out."""
    app = FastAPI(title="litpipe serve", description="Text search and zero-shot classification over a litpipe cache.",
                  docs_url=None, redoc_url=None)
    page = files("litpipe.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.exception_handler(UserError)
    def _user_error(request: Request, err: UserError) -> JSONResponse:
        return JSONResponse({"error": str(err)}, status_code=404 if isinstance(err, ImageSourceError) else 400)

    @app.exception_handler(RequestValidationError)
    def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in err.errors()]
        return JSONResponse({"error": "; ".join(problems)}, status_code=422)

    @app.exception_handler(HTTPException)
    def _http_error(request: Request, err: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(err.detail)}, status_code=err.status_code)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    @app.get("/api/info")
    def info() -> dict:
        """What is being served: cache, checkpoint, index, class names, and whether images can be shown."""
        return explorer.info()

    @app.get("/api/search")
    def search(q: str = Query(description="what to look for"), k: int = Query(12, ge=1, le=MAX_K)) -> dict:
        """The k cached images closest to the text `q`, best first."""
        start = time.perf_counter()
        hits = explorer.search(q, k)
        return {"query": q, "hits": hits, "elapsed_ms": round(1000 * (time.perf_counter() - start), 1)}

    @app.post("/api/zeroshot")
    def zeroshot(request: ZeroShotRequest) -> dict:
        """Every cached image assigned to one of the classes; per class its count and best images."""
        start = time.perf_counter()
        result = explorer.zeroshot(request)
        return {**result, "elapsed_ms": round(1000 * (time.perf_counter() - start), 1)}

    @app.get("/api/image/{key:path}", response_class=Response)
    def image(key: str) -> Response:
        """The original image bytes of a cached key, read from the source shard it was embedded from."""
        data = explorer.image(key)
        return Response(data, media_type=image_mime(data), headers={"Cache-Control": "max-age=3600"})

    return app

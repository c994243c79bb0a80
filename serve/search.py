"""Text-to-image search over a cache with a trained text tower, and an HTML contact sheet of the hits."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import torch.nn.functional as F

from PIL import Image

from litpipe.config import PipelineConfig
from litpipe.serve.image_source import ImageFetcher
from litpipe.scoring.search_index import build_index
from litpipe.scoring.suite import image_side
from litpipe.scoring.text_features import encode_texts
from litpipe.store import load_all, resolve_cache
from litpipe.models.text_tower import load_text_tower


class CacheSearch:
    """One cache's image embeddings in a search index, queried by text; loaded once, searched often."""

    def __init__(self, cfg: PipelineConfig, dataset: str, checkpoint: str, cache: str | None = None):
        self.cache = resolve_cache(cfg, dataset, cache)  # `cache`: an id or URL instead of `dataset`'s own
        self.contents = load_all(self.cache)
        self.tower, self.tokenizer, _ = load_text_tower(checkpoint)
        self.index = build_index(F.normalize(image_side(self.tower, self.contents.embeddings), dim=-1), cfg.eval.index,
                                 nlist=cfg.eval.ivf_nlist, nprobe=cfg.eval.ivf_nprobe)
        self.fetcher = ImageFetcher(self.cache, cfg.data[dataset])

    def search(self, query: str, k: int = 10) -> list[dict]:
        """The k best images for `query`: rank, score, key, captions."""
        scores, ids = self.index.search(encode_texts(self.tower, self.tokenizer, [query]), k)
        return [{"rank": rank + 1, "score": float(s), "key": self.contents.keys[i], "captions": self.contents.captions[i]}
                for rank, (s, i) in enumerate(zip(scores[0].tolist(), ids[0].tolist())) if i >= 0]


def contact_sheet(query: str, hits: list[dict], images: dict[str, bytes]) -> str:
    """A self-contained HTML page: a grid of the hits' images (inline), key, score and caption."""
    cells = []
    for hit in hits:
        data = images.get(hit["key"])
        picture = (f'<img src="data:{image_mime(data)};base64,{base64.b64encode(data).decode()}">' if data
                   else '<div class="missing">image not found in its source</div>')
        caption = html.escape(hit["captions"][0] if hit["captions"] else "")
        cells.append(f'<figure>{picture}<figcaption><b>#{hit["rank"]}</b> {hit["score"]:.3f} '
                     f'<code>{html.escape(hit["key"])}</code><br>{caption}</figcaption></figure>')
    return ("<!doctype html><meta charset='utf-8'><title>litpipe search: " + html.escape(query) + "</title>"
            "<style>body{font-family:sans-serif}main{display:grid;grid-template-columns:repeat(auto-fill,200px);gap:12px}"
            "img{width:200px;height:200px;object-fit:contain;background:#eee}figure{margin:0}"
            "figcaption{font-size:12px}.missing{width:200px;height:200px;background:#fcc}</style>"
            f"<h2>{html.escape(query)}</h2><main>{''.join(cells)}</main>\n")


def image_mime(data: bytes) -> str:
    try:
        return Image.open(io.BytesIO(data)).get_format_mimetype() or "image/jpeg"
    except Exception:  # unreadable bytes: let the browser sniff
        return "application/octet-stream"


def write_contact_sheet(search: CacheSearch, query: str, hits: list[dict], path: str | Path) -> Path:
    images = search.fetcher.fetch([h["key"] for h in hits])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(contact_sheet(query, hits, images), encoding="utf-8")
    return path

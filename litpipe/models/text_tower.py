"""The text tower the trainer writes and eval reads, and its on-disk format.

`TextTower` is a text tower open_clip builds from a `CLIPTextCfg`: its CLIP-style TextTransformer,
or a Hugging Face language model behind open_clip's HFTextEncoder (`hf_model_name`, its poolers and
projection). Its projection maps to the cached image embedding's dim; LiT's learnable temperature and
SigLIP's learnable bias sit beside it. The artifact is a folder at any fsspec URL:

    config.json               {"format": "litpipe-text-tower/1", "embed_dim": D, "text_cfg": {...},
                               "meta": {...}}   text_cfg = open_clip CLIPTextCfg fields
    text_tower.safetensors    float32 state dict: text.* (open_clip's names), logit_scale (log of the
                               temperature), logit_bias
    tokenizer.json            the tokenizer (`litpipe.models.tokenizer.Tokenizer.load`)
    hf_config.json            HF towers only: the language model's config, so the folder alone rebuilds it

`load_text_tower(url)` gives back `(tower, tokenizer, meta)`; `tower(tokens)` returns
L2-normalised features [N, D] comparable (by dot product) with the normalised cached embeddings.
It also reads the text half of a `litpipe export` folder (open_clip_config.json +
open_clip_model.safetensors + tokenizer.json), and head-only training's heads over a frozen text model
(`litpipe.models.heads`), so eval and serve take any of them.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, fields
from pathlib import Path

import fsspec
import torch
import torch.nn.functional as F
from open_clip.hf_configs import arch_dict
from open_clip.model import CLIPTextCfg, _build_text_tower
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from litpipe.errors import UserError
from litpipe.models.tokenizer import Tokenizer

FORMAT = "litpipe-text-tower/1"
CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "text_tower.safetensors", "tokenizer.json"
HF_CONFIG_FILE = "hf_config.json"
EXPORT_CONFIG_FILE, EXPORT_WEIGHTS_FILE = "open_clip_config.json", "open_clip_model.safetensors"


class TextTowerError(UserError):
    """A text-tower artifact or init source that cannot be used."""


class TextTower(torch.nn.Module):
    """open_clip's text tower projecting to `embed_dim`, with logit scale and bias."""

    def __init__(self, text_cfg: dict, embed_dim: int, init_temperature: float = 10.0, init_bias: float = -10.0):
        super().__init__()
        self.tokenizer: Tokenizer | None = None  # what turns captions into its input ids; saved beside it
        cfg = CLIPTextCfg(**text_cfg)
        self.text_cfg = asdict(cfg)
        self.embed_dim = embed_dim
        try:
            self.text = _build_text_tower(embed_dim, cfg)
        except (OSError, ValueError) as err:  # transformers' words for a model it cannot load
            if not cfg.hf_model_name:
                raise
            raise TextTowerError(f"train.tower.hf_model {cfg.hf_model_name}: open_clip's HF text encoder could not build it "
                                 f"({type(err).__name__}: {err}); give a local model folder or a hub id (needs the network)") from None
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(init_temperature)))
        self.logit_bias = torch.nn.Parameter(torch.tensor(float(init_bias)))

    @property
    def context_length(self) -> int:
        return self.text_cfg["context_length"]

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def hf_config(self):
        """The language model's transformers config (HF towers), else None."""
        return self.text.config if self.text_cfg["hf_model_name"] else None

    def lock(self) -> None:
        """LiT's LL for the text side: every weight frozen but the projection (and temperature, bias)."""
        for name, p in self.text.named_parameters():
            p.requires_grad = name.startswith(("proj.", "text_projection"))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(tokens), dim=-1)

    def project_images(self, images: torch.Tensor) -> torch.Tensor:
        """The cached image vectors as this text side compares with them: as they are (the image tower is
        locked and has no head; head-only training's `Heads` has one). Every text side answers this."""
        return images

    def save(self, url: str, meta: dict | None = None) -> None:
        """The tower with the tokenizer it was trained with (`tokenizer`, set by whoever built it)."""
        save_text_tower(url, self, self.tokenizer, meta)

    def for_eval(self, device: torch.device):
        """(text tower, tokenizer) as eval calls them."""
        return self, self.tokenizer


def build_text_tower(tower_cfg, embed_dim: int, tokenizer: Tokenizer | None = None, init_temperature: float = 10.0,
                     init_bias: float = -10.0) -> TextTower:
    """A TextTower from pipeline.yaml's `train.tower`, in LiT's setting `tower_cfg.setting`.

    `hf_model`: a Hugging Face language model through open_clip's HF text encoder, its pretrained weights
    (LU, LL) or a random init of its architecture (Lu). Otherwise the CLIP-style tower: random (Lu), or
    `init`, an open_clip model (`name[@pretrained]`, `local-dir:`/`hf-hub:` id) whose text config replaces
    width/layers/heads/context/vocab and whose weights are copied (LU, LL), except a projection of another
    dim. A random CLIP-style tower with a non-CLIP `tokenizer` pools at that tokenizer's end token.
    """
    setting = tower_cfg.setting
    if tower_cfg.hf_model:
        text_cfg = {"hf_model_name": tower_cfg.hf_model, "hf_model_pretrained": setting != "Lu",
                    "hf_proj_type": tower_cfg.hf_proj, "context_length": tower_cfg.context_length,
                    # named, not left to open_clip's default, so an export pools as training did
                    "hf_pooler_type": tower_cfg.hf_pooler or _default_pooler(tower_cfg.hf_model)}
        tower = TextTower(text_cfg, embed_dim, init_temperature, init_bias)
    elif tower_cfg.init == "random":
        text_cfg = {k: getattr(tower_cfg, k) for k in ("width", "layers", "heads", "context_length", "vocab_size")}
        if tokenizer is not None and tokenizer.framing == "native":
            if tokenizer.end_id is None:
                raise TextTowerError("train.tokenizer adds no end token, where a CLIP-style tower pools; use a "
                                     "tokenizer whose template ends every text (BERT's [SEP], T5's </s>)")
            text_cfg.update(pool_type="eos", eos_id=tokenizer.end_id, pad_id=tokenizer.pad_id)
        tower = TextTower(text_cfg, embed_dim, init_temperature, init_bias)
    else:
        if tokenizer is not None and tokenizer.framing == "native":
            raise TextTowerError(f"train.tower.init {tower_cfg.init}: an open_clip text tower reads CLIP's tokens; "
                                 "set train.tokenizer: clip (or auto), or start from `random`")
        source = _load_open_clip_text(tower_cfg.init)
        tower = TextTower(source["text_cfg"], embed_dim, init_temperature, init_bias)
        if setting != "Lu":
            state = {k: v for k, v in source["state"].items() if k != "text_projection" or v.shape[-1] == embed_dim}
            missing, unexpected = tower.text.load_state_dict(state, strict=False)
            if unexpected or set(missing) - {"text_projection", "text_projection.weight"}:
                raise TextTowerError(f"train.tower.init {tower_cfg.init}: its text tower does not fit open_clip's "
                                     f"TextTransformer (missing {missing[:3]}, unexpected {unexpected[:3]}); use a "
                                     "CLIP-style model or `random`")
    if setting == "LL":
        tower.lock()
    return tower


def _default_pooler(source: str) -> str:
    """open_clip's pooler for the model type of `source` (its arch_dict), named with the fix when unknown."""
    try:
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(source).model_type
    except ImportError:
        raise TextTowerError("train.tower.hf_model needs `transformers`; pip install 'litpipe[hf]'") from None
    except (OSError, ValueError) as err:
        raise TextTowerError(f"train.tower.hf_model {source}: no model config there ({err}); give a local model folder "
                             "or a hub id (needs the network)") from None
    if model_type not in arch_dict:
        raise TextTowerError(f"train.tower.hf_model {source}: open_clip's HF text encoder does not know `{model_type}` "
                             f"models; it knows {', '.join(sorted(arch_dict))}")
    return arch_dict[model_type]["pooler"]


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
    if tower.hf_config is not None:
        with fs.open(f"{root}/{HF_CONFIG_FILE}", "w") as f:
            f.write(tower.hf_config.to_json_string())
    config = {"format": FORMAT, "embed_dim": tower.embed_dim, "text_cfg": tower.text_cfg, "meta": meta or {}}
    with fs.open(f"{root}/{CONFIG_FILE}", "w") as f:
        f.write(json.dumps(config, indent=2, default=str))


def load_text_tower(url: str, device: str = "cpu") -> tuple[TextTower, Tokenizer, dict]:
    """Read a trained text side: (tower in eval mode, tokenizer, meta) of a folder written by `save_text_tower`,
    by `litpipe export`, or by head-only training (`models.heads`: the frozen text model with its heads, which
    eval and serve call the same way: `tower(tokenizer(texts))`, `tower.project_images(vectors)`)."""
    fs, root = fsspec.core.url_to_fs(url)
    exported = fs.exists(f"{root}/{EXPORT_CONFIG_FILE}")  # an HF tower's export has a config.json too: the model's
    if not exported:
        from litpipe.models.heads import heads_config, load_heads

        heads = heads_config(url)
        if heads is not None:  # head-only training's heads over a frozen text model
            return load_heads(url, heads, device)
    try:
        with fs.open(f"{root}/{EXPORT_CONFIG_FILE if exported else CONFIG_FILE}", "r") as f:
            config = json.load(f)
        with fs.open(f"{root}/{EXPORT_WEIGHTS_FILE if exported else WEIGHTS_FILE}", "rb") as f:
            state = load_safetensors(f.read())
        with fs.open(f"{root}/{TOKENIZER_FILE}", "r") as f:
            tokenizer_json = f.read()
        text_cfg = (config["model_cfg"] if exported else config)["text_cfg"]
        hf_config = None
        if text_cfg.get("hf_model_name"):
            with fs.open(f"{root}/{'config.json' if exported else HF_CONFIG_FILE}", "r") as f:
                hf_config = f.read()
    except FileNotFoundError as err:
        raise TextTowerError(f"{url}: not a text-tower or export folder ({err.filename or err} missing); "
                             "run `litpipe train` or point eval.checkpoint at its output") from None
    if exported:  # the CLIP state dict: text weights at the top level (CLIP) or under text. (HF towers)
        config = {"format": FORMAT, "embed_dim": config["model_cfg"]["embed_dim"],
                  "text_cfg": text_cfg, "meta": config.get("litpipe", {}).get("text_tower", {})}
        state = {k if k.startswith(("logit_", "text.")) else f"text.{k}": v for k, v in state.items()
                 if not k.startswith("visual.")}
        state.setdefault("logit_bias", torch.tensor(0.0))  # softmax-trained exports carry no bias
    if config.get("format") != FORMAT:
        raise TextTowerError(f"{url}/{CONFIG_FILE}: format {config.get('format')!r}, expected {FORMAT!r}")
    with tempfile.TemporaryDirectory(prefix="litpipe-hf-config-") as local:
        if hf_config is not None:  # the language model rebuilt from the saved config, its weights from the state
            Path(local, "config.json").write_text(hf_config)
            text_cfg = {**text_cfg, "hf_model_name": local, "hf_model_pretrained": False}
        tower = TextTower(text_cfg, config["embed_dim"])
    tower.text_cfg["hf_model_name"] = config["text_cfg"].get("hf_model_name")  # where it came from, not the temp copy
    tower.load_state_dict(state)
    from tokenizers import Tokenizer as RustTokenizer

    tokenizer = Tokenizer(RustTokenizer.from_str(tokenizer_json), tower.context_length)
    tower.tokenizer = tokenizer
    return tower.to(device).eval(), tokenizer, config.get("meta", {})

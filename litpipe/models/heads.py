"""Head-only training's model: small trainable heads over cached features of both sides (no tower runs).

`Heads` maps a frozen text model's feature (text head) and a cached image vector (image head) into one
space, with LiT's learnable temperature and SigLIP's bias beside them. ShareLock's default is no
image head and a 4-layer text MLP. The trained artifact is a folder:

    config.json        {"format": "litpipe-heads/1", "text_model": {...}, "text_model_fingerprint": {...},
                        "heads": {...}, "text_dim", "image_dim", "meta"}
    heads.safetensors  float32: text.*, image.*, logit_scale, logit_bias
    text_model/        an export only: a copy of the local text model, which config.json then names `text_model`

`load_heads(url)` gives a `HeadTextTower`: the frozen text model with the text head, which eval and
serve call like a text tower (`tower(tokenizer(texts))`), and `project_images` for the cached vectors.
"""

from __future__ import annotations

import json
import math

import fsspec
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from litpipe.config import HeadConfig, HeadsConfig, TextModelConfig
from litpipe.errors import UserError

FORMAT = "litpipe-heads/1"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "heads.safetensors"
TEXT_MODEL_FOLDER = "text_model"  # an export's copy of a local text model, named relative to the export


def build_head(cfg: HeadConfig, in_dim: int, out_dim: int) -> torch.nn.Module:
    if cfg.kind == "none":
        return torch.nn.Identity()
    if cfg.kind == "linear":
        return torch.nn.Linear(in_dim, out_dim, bias=cfg.bias)
    layers, width = [], in_dim
    for _ in range(cfg.depth - 1):
        layers += [torch.nn.Linear(width, cfg.width, bias=cfg.bias), torch.nn.GELU()]
        width = cfg.width
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, out_dim, bias=cfg.bias))


class Heads(torch.nn.Module):
    """Text head and image head into a `embed_dim` space; `forward(text features)` gives unit rows.

    A text side as the trainer sees one (as `TextTower` is): `project_images`, `save`, `for_eval`. It keeps
    the frozen text model it was trained over (`text_model`, its fingerprint), which saving names and
    eval runs."""

    def __init__(self, cfg: HeadsConfig, text_dim: int, image_dim: int, init_temperature: float = 10.0,
                 init_bias: float = -10.0, text_model: TextModelConfig | None = None,
                 text_model_fingerprint: dict | None = None):
        super().__init__()
        self.cfg, self.text_dim, self.image_dim = cfg, text_dim, image_dim
        self.text_model, self.text_model_fingerprint = text_model, text_model_fingerprint
        self._for_eval: dict = {}  # a plain dict: the eval tower (with the frozen model) is no submodule to save
        self.embed_dim = cfg.dim or image_dim
        if cfg.text.kind == "none" and text_dim != self.embed_dim:
            raise UserError(f"train.heads.text: none keeps the text model's {text_dim}-d features, but the shared space "
                            f"is {self.embed_dim}-d; give a linear or mlp text head")
        self.text = build_head(cfg.text, text_dim, self.embed_dim)
        self.image = build_head(cfg.image, image_dim, self.embed_dim)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(init_temperature)))
        self.logit_bias = torch.nn.Parameter(torch.tensor(float(init_bias)))

    def forward(self, text_features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(text_features.float()), dim=-1)

    def project_images(self, images: torch.Tensor) -> torch.Tensor:
        """Cached image vectors into the shared space (not normalised: the loss and eval normalise)."""
        return self.image(images.float())

    def save(self, url: str, meta: dict | None = None) -> None:
        save_heads(url, self, self.text_model, self.text_model_fingerprint, meta)

    def for_eval(self, device: torch.device):
        """(text tower, tokenizer) as eval calls them: the frozen text model (loaded on first use) + these heads."""
        if device not in self._for_eval:
            from litpipe.models.text_model import FrozenTextModel

            tower = HeadTextTower(FrozenTextModel(self.text_model, device), self)
            self._for_eval[device] = (tower, tower.model.tokenize)
        return self._for_eval[device]


class HeadTextTower(torch.nn.Module):
    """The frozen text model with the trained text head: ids (`model.tokenize`) -> unit features."""

    def __init__(self, model, heads: Heads):
        super().__init__()
        self.model, self.heads, self.embed_dim = model, heads, heads.embed_dim
        self.logit_scale, self.logit_bias = heads.logit_scale, heads.logit_bias

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.heads(self.model.features(ids).to(self.heads.logit_scale.device))

    def project_images(self, images: torch.Tensor) -> torch.Tensor:
        """Cached vectors (on the CPU, any number) through the image head on its device, back on the CPU."""
        device = self.logit_scale.device
        return torch.cat([self.heads.project_images(chunk.to(device)).float().cpu() for chunk in images.split(65536)]) \
            if len(images) else images


def save_heads(url: str, heads: Heads, text_cfg: TextModelConfig, fingerprint: dict, meta: dict | None = None) -> None:
    """Write the artifact folder at `url` (any fsspec URL); weights first, config last."""
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in heads.state_dict().items()}
    with fs.open(f"{root}/{WEIGHTS_FILE}", "wb") as f:
        f.write(save_safetensors(state))
    config = {"format": FORMAT, "text_model": text_cfg.model_dump(mode="json"), "text_model_fingerprint": fingerprint,
              "heads": heads.cfg.model_dump(mode="json"), "text_dim": heads.text_dim, "image_dim": heads.image_dim,
              "meta": meta or {}}
    with fs.open(f"{root}/{CONFIG_FILE}", "w") as f:
        f.write(json.dumps(config, indent=2, default=str))


def heads_config(url: str) -> dict | None:
    """The config.json of a `save_heads` folder at `url`; None for any other folder (a text tower, an export)."""
    fs, root = fsspec.core.url_to_fs(url)
    try:
        config = json.loads(fs.cat_file(f"{root}/{CONFIG_FILE}"))
    except FileNotFoundError:
        return None
    return config if config.get("format") == FORMAT else None


def load_heads(url: str, config: dict, device: str = "cpu"):
    """(HeadTextTower in eval mode, its tokenizer: the text model's `tokenize`, meta) of a `save_heads` folder
    whose config.json is `config`."""
    from litpipe.models.text_model import FrozenTextModel

    fs, root = fsspec.core.url_to_fs(url)
    with fs.open(f"{root}/{WEIGHTS_FILE}", "rb") as f:
        state = load_safetensors(f.read())
    text_cfg = TextModelConfig(**config["text_model"])
    if text_cfg.model == TEXT_MODEL_FOLDER and fs.isdir(f"{root}/{TEXT_MODEL_FOLDER}"):
        text_cfg.model = f"{root}/{TEXT_MODEL_FOLDER}"  # the copy inside the folder, wherever it was moved
    heads = Heads(HeadsConfig(**config["heads"]), config["text_dim"], config["image_dim"], text_model=text_cfg,
                  text_model_fingerprint=config["text_model_fingerprint"])
    heads.load_state_dict(state)
    model = FrozenTextModel(text_cfg, device=device)
    if model.fingerprint()["weights_sha256"] != config["text_model_fingerprint"]["weights_sha256"]:
        raise UserError(f"{url}: its heads were trained on features of other weights than {config['text_model']['model']} "
                        "holds now; point train.text_model.model at the model they were trained with")
    tower = HeadTextTower(model, heads.to(device)).eval()
    return tower, model.tokenize, config.get("meta", {})

"""`litpipe export`: the locked image tower + the trained text tower as one open_clip model folder.

    DIR/open_clip_config.json       {"model_cfg": {embed_dim, vision_cfg, text_cfg, ...}, "preprocess_cfg"}
    DIR/open_clip_model.safetensors the CLIP state dict (visual.* from the encoder, text from the tower)
    DIR/tokenizer.json              the training tokenizer
    DIR/bpe_vocab.txt.gz            a BPE `litpipe tokenizer train` fitted: its merges, which open_clip's
                                    SimpleTokenizer reads (text_cfg.tokenizer_kwargs.bpe_path); none for CLIP's own
    DIR/tokenizer_config.json       a native (non-CLIP) tokenizer: what open_clip's HFTokenizer needs to load it
    DIR/config.json                 an HF text tower: the language model's config (open_clip's CustomTextCLIP
                                    rebuilds it from DIR, the folder's absolute path: move the folder, edit it)

`open_clip.create_model_and_transforms("local-dir:DIR")` loads it; `open_clip.get_tokenizer("local-dir:DIR")`
gives the training tokenizer's ids: a CLIP-style BPE through open_clip's SimpleTokenizer reading DIR's merges,
a native one through open_clip's HFTokenizer. open_clip reads a fitted BPE's merges and an HF text tower's
config by the absolute paths inside (its local-dir format has no relative form): a folder with either is
moved by editing them; one with CLIP's own BPE and a CLIP-style tower loads from anywhere, and litpipe's own
loader (`load_text_tower`: eval, serve) reads every export from the files inside it, wherever it is.

open_clip cannot express a Hugging Face vision tower (DINOv2, SigLIP), so for `encoder.source: hf` DIR is the
text-tower folder (`litpipe.models.text_tower`'s format) plus what names the image side:

    DIR/image_tower.json            the transformers class and model (hub id or absolute folder), the output
                                    cached and how to take it from the model's outputs, its weights' sha256
    DIR/image_processor/            the model's image processor, saved (`AutoImageProcessor.from_pretrained`)

README's "Exporting a Hugging Face image tower" holds the loading snippet (tests run it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from litpipe.config import PipelineConfig
from litpipe.errors import UserError
from litpipe.models.heads import CONFIG_FILE as HEADS_CONFIG
from litpipe.models.heads import TEXT_MODEL_FOLDER as HEADS_TEXT_MODEL
from litpipe.models.heads import WEIGHTS_FILE as HEADS_WEIGHTS
from litpipe.models.heads import heads_config
from litpipe.models.image_encoder import load_encoder
from litpipe.models.text_tower import TextTower, load_text_tower
from litpipe.models.tokenizer import Tokenizer, clip_tokenizer, hf_tokenizer


def export_model(cfg: PipelineConfig, out: str, checkpoint: str | None = None) -> Path:
    """Write the open_clip folder for `cfg.encoder` + the text tower at `checkpoint` (default: train's final)."""
    url = checkpoint or cfg.final_text_tower
    heads = heads_config(url)
    if heads is not None:
        return _export_heads(cfg, url, heads, Path(out).absolute())
    tower, tokenizer, meta = load_text_tower(url)
    return _export_text_tower(cfg, tower, tokenizer, meta, Path(out).absolute())


def _export_text_tower(cfg: PipelineConfig, tower: TextTower, tokenizer: Tokenizer, meta: dict, folder: Path) -> Path:
    encoder = load_encoder(cfg.encoder, device="cpu")
    if cfg.encoder.source == "timm":
        model_cfg, visual_state = _timm_model_cfg(cfg, encoder)
    elif cfg.encoder.source == "open_clip":
        model_cfg, visual_state = _open_clip_model_cfg(cfg, encoder)
    else:
        model_cfg, visual_state = {"embed_dim": encoder.dim}, {}
    if model_cfg["embed_dim"] != tower.embed_dim:
        raise UserError(f"export: the text tower projects to {tower.embed_dim} but the image tower gives "
                        f"{model_cfg['embed_dim']}; train on a cache of this encoder")
    if cfg.encoder.source == "hf":
        return _export_beside_hf_tower(cfg, encoder, tower, tokenizer, meta, folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_cfg["text_cfg"] = {k: v for k, v in tower.text_cfg.items() if v is not None}
    state = dict(visual_state)
    if tower.hf_config is not None:  # open_clip's CustomTextCLIP: the language model rebuilt from this folder
        model_cfg["custom_text"] = True
        model_cfg["text_cfg"].update(hf_model_name=str(folder), hf_model_pretrained=False)
        (folder / "config.json").write_text(tower.hf_config.to_json_string())
        state.update({f"text.{k}": v for k, v in tower.text.state_dict().items()})
    else:
        state.update(tower.text.state_dict())
    if tokenizer.framing == "clip" and tokenizer.rust.to_str() == clip_tokenizer().rust.to_str():
        pass  # CLIP's own BPE: open_clip's SimpleTokenizer has it, and the folder loads wherever it is moved
    elif tokenizer.framing == "clip":  # a fitted BPE: SimpleTokenizer reads its merges, by absolute path
        tokenizer.save_merges(str(folder / "bpe_vocab.txt.gz"))
        model_cfg["text_cfg"]["tokenizer_kwargs"] = {"bpe_path": str(folder / "bpe_vocab.txt.gz")}
    else:  # open_clip's HFTokenizer reads it from this folder (local-dir:)
        model_cfg["text_cfg"]["hf_tokenizer_name"] = str(folder)
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": tower.context_length,
            "pad_token": tokenizer.rust.id_to_token(tokenizer.pad_id)}))
    state["logit_scale"] = tower.logit_scale.detach().clone()
    if meta.get("loss") == "sigmoid":
        model_cfg["init_logit_bias"] = float(tower.logit_bias)
        state["logit_bias"] = tower.logit_bias.detach().clone()
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": model_cfg, "preprocess_cfg": _preprocess_cfg(encoder),
         "litpipe": {"text_tower": meta, "encoder": encoder.fingerprint}}, indent=2, default=str))
    save_file({k: v.detach().float().contiguous() for k, v in state.items()}, str(folder / "open_clip_model.safetensors"))
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def _export_heads(cfg: PipelineConfig, url: str, config: dict, folder: Path) -> Path:
    """Head-only training's heads: as an open_clip model where open_clip's HF text encoder expresses them (its
    pooler, a bias-free linear or 2-layer MLP projection, no image head), else the heads folder with the image
    tower named beside it (image_tower.json), which the README's heads snippet loads."""
    why_not = _why_open_clip_cannot(cfg, config)
    if why_not is None:
        tower = _heads_as_hf_text_tower(url, config)
        tokenizer = hf_tokenizer(config["text_model"]["model"], tower.context_length)
        return _export_text_tower(cfg, tower, tokenizer, config["meta"], folder)
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / HEADS_WEIGHTS).write_bytes(fs.cat_file(f"{root}/{HEADS_WEIGHTS}"))
    model = config["text_model"]["model"]
    if Path(model).is_dir():  # the model's files travel inside, named relative to the folder: it loads wherever it goes
        shutil.copytree(model, folder / HEADS_TEXT_MODEL, dirs_exist_ok=True)
        config = {**config, "text_model": {**config["text_model"], "model": HEADS_TEXT_MODEL}}
    (folder / HEADS_CONFIG).write_text(json.dumps(config, indent=2, default=str))
    encoder = load_encoder(cfg.encoder, device="cpu")
    if cfg.encoder.source == "hf":
        return _write_hf_image_manifest(cfg, encoder, folder, why_not)
    (folder / "image_tower.json").write_text(json.dumps({
        "format": "litpipe-image-tower/1", "library": cfg.encoder.source, "model": cfg.encoder.model,
        "pretrained": cfg.encoder.pretrained, "output": cfg.encoder.output, "preprocess_cfg": _preprocess_cfg(encoder),
        "not_open_clip": why_not, "encoder": encoder.fingerprint}, indent=2, default=str))
    return folder


def _why_open_clip_cannot(cfg: PipelineConfig, config: dict) -> str | None:
    """Why open_clip's CLIP with its HF text encoder cannot hold these heads, or None when it can."""
    from open_clip.hf_configs import arch_dict
    from transformers import AutoConfig

    text, heads = config["text_model"], config["heads"]
    head, width = heads["text"], (config["text_dim"] + (heads["dim"] or config["image_dim"])) // 2
    reasons = {
        "an image head (open_clip adds none to the locked tower)": heads["image"]["kind"] != "none",
        f"pooling `{text['pooling']}` (open_clip's HF poolers: cls, mean)": text["pooling"] not in ("cls", "mean"),
        "a text head with biases (open_clip's projections have none)": head["kind"] != "none" and head["bias"],
        f"a text MLP other than open_clip's (depth 2, width {width})": head["kind"] == "mlp" and (head["depth"], head["width"]) != (2, width),
        "no text head": head["kind"] == "none",
        f"an image tower of source {cfg.encoder.source}": cfg.encoder.source == "hf",
        "a text model open_clip's HF encoder does not know": AutoConfig.from_pretrained(text["model"]).model_type not in arch_dict,
    }
    found = [reason for reason, applies in reasons.items() if applies]
    return "; ".join(found) if found else None


def _heads_as_hf_text_tower(url: str, config: dict) -> TextTower:
    """The frozen text model and the trained text head as open_clip's HF text tower (the model's own weights, the
    head as its projection), with the heads' temperature and bias."""
    import fsspec
    from safetensors.torch import load as load_safetensors

    from transformers import AutoConfig

    text, head = config["text_model"], config["heads"]["text"]
    fs, root = fsspec.core.url_to_fs(url)
    state = load_safetensors(fs.cat_file(f"{root}/{HEADS_WEIGHTS}"))
    positions = getattr(AutoConfig.from_pretrained(text["model"]), "max_position_embeddings", None)
    # open_clip pads every text to the context length: no longer than the model's positions
    context = min(text["max_length"], positions or text["max_length"])
    tower = TextTower({"hf_model_name": text["model"], "hf_model_pretrained": True, "hf_proj_type": head["kind"],
                       "hf_pooler_type": {"cls": "cls_last_hidden_state_pooler", "mean": "mean_pooler"}[text["pooling"]],
                       "context_length": context}, config["heads"]["dim"] or config["image_dim"])
    proj = {k.removeprefix("text."): v for k, v in state.items() if k.startswith("text.")}
    tower.text.proj.load_state_dict({"weight": proj["weight"]} if head["kind"] == "linear" else
                                    {"0.weight": proj["0.weight"], "2.weight": proj["2.weight"]})
    tower.logit_scale.data.copy_(state["logit_scale"])
    tower.logit_bias.data.copy_(state["logit_bias"])
    return tower.eval()


def _export_beside_hf_tower(cfg: PipelineConfig, encoder, tower, tokenizer, meta: dict, folder: Path) -> Path:
    """The text tower as litpipe saves it beside the Hugging Face image tower's manifest."""
    from litpipe.models.text_tower import save_text_tower

    save_text_tower(str(folder), tower, tokenizer, meta)
    return _write_hf_image_manifest(cfg, encoder, folder)


def _write_hf_image_manifest(cfg: PipelineConfig, encoder, folder: Path, why_not: str | None = None) -> Path:
    """The image processor saved beside the text side, and image_tower.json naming the transformers model and how
    its cached output is taken (what the README's loading snippets read)."""
    import transformers

    from litpipe.models.image_towers import HF_VISION, hf_prefix_tokens

    transformers.AutoImageProcessor.from_pretrained(cfg.encoder.model).save_pretrained(folder / "image_processor")
    model = cfg.encoder.model
    manifest = {
        "format": "litpipe-image-tower/1", "library": "transformers",
        "class": HF_VISION[encoder.model.config.model_type][0],
        "model": str(Path(model).absolute()) if Path(model).exists() else model,
        "output": cfg.encoder.output, "prefix_tokens": hf_prefix_tokens(encoder.model),
        "normalize": cfg.encoder.normalize, "processor": "image_processor",
        "weights_sha256": encoder.fingerprint["weights_sha256"],
        **({"not_open_clip": why_not} if why_not else {}), "encoder": encoder.fingerprint,
    }
    (folder / "image_tower.json").write_text(json.dumps(manifest, indent=2, default=str))
    return folder


def _open_clip_model_cfg(cfg: PipelineConfig, encoder) -> tuple[dict, dict]:
    """open_clip's own config of the encoder's model, and its image tower's weights."""
    import open_clip

    if cfg.encoder.output != "projected":
        raise UserError(f"export: encoder.output is `{cfg.encoder.output}`, which an open_clip CLIP cannot express; "
                        "export models trained on a `projected` cache")
    pretrained = cfg.encoder.pretrained or ""
    model_cfg = open_clip.get_model_config(pretrained if pretrained.startswith("hf-hub:") else cfg.encoder.model)
    if model_cfg is None:
        raise UserError(f"export: open_clip has no config for encoder.model `{cfg.encoder.model}`; give encoder.architecture")
    if model_cfg.get("quick_gelu"):
        raise UserError(f"export: `{cfg.encoder.model}` uses QuickGELU for both towers in open_clip, the text tower was "
                        "trained with GELU; export needs a GELU image tower")
    model_cfg = {k: v for k, v in model_cfg.items() if k not in ("custom_text", "text_cfg", "init_logit_bias")}
    return model_cfg, {f"visual.{k}": v for k, v in encoder.model.visual.state_dict().items()}


def _timm_model_cfg(cfg: PipelineConfig, encoder) -> tuple[dict, dict]:
    """open_clip's timm image tower (`vision_cfg.timm_model_name`) as litpipe ran it: the model without its
    classifier, its own pooling, no projection added, so open_clip's image features are the cached ones."""
    if cfg.encoder.output != "pooled":
        raise UserError(f"export: encoder.output is `{cfg.encoder.output}`; open_clip's timm tower gives the pooled "
                        "(pre-logits) features, so export models trained on a `pooled` cache")
    model = encoder.model
    vision_cfg = {"timm_model_name": cfg.encoder.model, "timm_model_pretrained": False,
                  "timm_pool": getattr(model, "global_pool", "avg"), "timm_proj": "none",
                  "image_size": list(encoder.image_size)}
    return ({"embed_dim": encoder.dim, "vision_cfg": vision_cfg},
            {f"visual.trunk.{k}": v for k, v in model.state_dict().items()})


def _preprocess_cfg(encoder) -> dict:
    """open_clip's preprocess_cfg for the tower: its size, mean, std, interpolation and resize mode. (open_clip's
    transform has no crop_pct: a timm tower's images are resized to the input size before the crop there.)"""
    if encoder.fingerprint.get("source", "open_clip") == "open_clip":
        return dict(encoder.model.visual.preprocess_cfg)
    pp = encoder.preprocess_cfg
    return {"size": list(encoder.image_size), "mode": "RGB", "mean": list(pp["mean"]), "std": list(pp["std"]),
            "interpolation": pp["interpolation"], "resize_mode": pp["resize_mode"], "fill_color": 0}

"""The image models litpipe can lock, each built by its own library with its own eval preprocessing.

- `open_clip`: a CLIP's image tower (`encoder.architecture` registers one open_clip does not ship).
- `timm`: any timm model by name (LiT's own towers are timm's `vit_*.augreg_in21k`), created without its
  classifier; preprocessing from timm's data config for that model (input size, interpolation, crop_pct,
  mean/std) through timm's own eval transform.
- `hf`: a `transformers` vision model (DINOv2 with or without registers, SigLIP / SigLIP 2 vision towers,
  CLIP vision towers) by hub id or folder, with its image processor's settings.

Each builder returns a `Tower`: the module, the forward that gives `encoder.output`, a PIL eval transform
that ends in ToTensor + Normalize (what `PixelSteps` splits between CPU and device) and its settings.
"""

from __future__ import annotations

import atexit
import difflib
import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from litpipe.config import EncoderConfig
from litpipe.errors import UserError


class EncoderError(UserError):
    """The encoder section cannot be turned into a model; the message says which key to fix."""


def check_model_name(cfg: EncoderConfig) -> None:
    """encoder.model against its library's list of models, on the driver before Ray or any weights load (a
    misspelt name otherwise arrives as a Ray worker's traceback); names that are paths or hub ids pass."""
    named = cfg.model if cfg.source != "hf" and not cfg.architecture else ""
    if not named or named.startswith(("hf-hub:", "local-dir:")) or (cfg.pretrained or "").startswith("hf-hub:"):
        return
    if cfg.source == "open_clip":
        import open_clip

        known, what = open_clip.list_models(), "open_clip.list_models()"
    else:
        import timm

        known, what, named = timm.list_models(), "timm.list_models()", named.split(".")[0]  # less a pretrained tag
    if named not in known:
        guess = difflib.get_close_matches(named, known, n=3)
        raise EncoderError(f"encoder.model `{cfg.model}`: {cfg.source} has no such model; "
                           + (f"did you mean {' or '.join(guess)}? " if guess else "") + f"{what} lists them")


@dataclass
class Tower:
    module: torch.nn.Module  # everything whose weights decide the features (hashed into the fingerprint)
    forward: Callable[[torch.Tensor], torch.Tensor]  # normalised pixels [B, 3, H, W] -> features [B, D]
    transform: Any  # PIL -> [3, H, W], ending in ToTensor, Normalize
    preprocess_cfg: dict  # size, mean, std, interpolation, resize_mode, resize_to (the shorter side before the crop)


def build_tower(cfg: EncoderConfig) -> Tower:
    return {"open_clip": _open_clip, "timm": _timm, "hf": _hf}[cfg.source](cfg)


def cls_patch_mean(tokens: torch.Tensor, prefix_tokens: int) -> torch.Tensor:
    """[B, N, D] final tokens -> [B, 2D]: the CLS token and the mean of the patch tokens (after the CLS and any
    register tokens), as SAIL and dino.txt cache DINOv2's."""
    return torch.cat([tokens[:, 0], tokens[:, prefix_tokens:].mean(dim=1)], dim=-1)


# --- open_clip ---------------------------------------------------------------------------

_REGISTRY_DIR: Path | None = None


def is_registered_here(name: str) -> bool:
    """Whether `name` is a custom architecture this process registered (not one open_clip ships)."""
    return _REGISTRY_DIR is not None and (_REGISTRY_DIR / f"{name}.json").exists()


def register_architecture(name: str, architecture: dict[str, Any]) -> None:
    """Make `name` an open_clip model (through its public `add_model_config`), replacing an earlier one."""
    import open_clip

    global _REGISTRY_DIR
    if _REGISTRY_DIR is None:
        _REGISTRY_DIR = Path(tempfile.mkdtemp(prefix="litpipe-open-clip-configs-"))
        atexit.register(shutil.rmtree, _REGISTRY_DIR, True)
        # open_clip rescans every registered folder on each add, so this one must outlive the call.
    missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(architecture)
    if missing:
        raise EncoderError(f"encoder.architecture: missing {', '.join(sorted(missing))}; "
                           "give an open_clip model config (embed_dim, vision_cfg, text_cfg)")
    (_REGISTRY_DIR / f"{name}.json").write_text(json.dumps(architecture))
    open_clip.add_model_config(_REGISTRY_DIR)


def _open_clip(cfg: EncoderConfig) -> Tower:
    import open_clip

    if cfg.architecture is not None:
        if cfg.model in open_clip.list_models() and not is_registered_here(cfg.model):
            raise EncoderError(f"encoder.model `{cfg.model}` is a model open_clip ships, but encoder.architecture "
                               "is set too and would replace it under that name; remove encoder.architecture (set it "
                               f"to null) to use open_clip's {cfg.model}, or give the custom architecture a name "
                               "of its own in encoder.model")
        register_architecture(cfg.model, cfg.architecture)
    pretrained = cfg.pretrained
    hub = pretrained.startswith("hf-hub:") if pretrained else False
    overrides = dict(
        force_image_size=cfg.image_size,
        image_mean=tuple(cfg.image_mean) if cfg.image_mean else None,
        image_std=tuple(cfg.image_std) if cfg.image_std else None,
        image_interpolation=cfg.image_interpolation,
        image_resize_mode=cfg.image_resize_mode,
    )
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            pretrained if hub else cfg.model, pretrained=None if hub else pretrained, device="cpu", **overrides)
    except RuntimeError as err:
        raise EncoderError(f"encoder: cannot build `{cfg.model}` (pretrained={pretrained!r}): {err}; "
                           "check encoder.model against open_clip.list_models() and encoder.pretrained against "
                           "open_clip.list_pretrained(), or give encoder.architecture") from None
    visual = model.visual
    if cfg.output == "cls_patch_mean":
        raise EncoderError("encoder.output: cls_patch_mean is for timm and Hugging Face ViTs; an open_clip tower gives "
                           "projected or pooled")
    if cfg.output == "pooled" and getattr(visual, "proj", None) is None:
        raise EncoderError(f"encoder.output: pooled needs an image tower with a separate `proj` "
                           f"(open_clip ViTs); `{cfg.model}` has none; use output: projected")

    def forward(images: torch.Tensor) -> torch.Tensor:
        if cfg.output == "projected":
            return model.encode_image(images)
        proj, visual.proj = visual.proj, None  # pooled: the tower without its final projection, for one forward
        try:
            return model.encode_image(images)
        finally:
            visual.proj = proj

    size = visual.preprocess_cfg["size"]
    return Tower(model, forward, preprocess, {**visual.preprocess_cfg, "resize_to": size if isinstance(size, int) else None})


# --- timm ----------------------------------------------------------------------------------

def _timm(cfg: EncoderConfig) -> Tower:
    import timm  # open_clip's own dependency
    if cfg.output == "projected":
        raise EncoderError(f"encoder.output: projected: timm's `{cfg.model}` has no projection; use output: pooled "
                           "(its pre-logits features, as LiT caches) or cls_patch_mean")
    kwargs: dict = {"num_classes": 0}  # no classifier: forward() gives the pre-logits features
    if cfg.pretrained == "timm":
        kwargs["pretrained"] = True
    elif cfg.pretrained:
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": cfg.pretrained})
    try:
        model = timm.create_model(cfg.model, **kwargs)
    except RuntimeError as err:
        raise EncoderError(f"encoder.model `{cfg.model}`: timm cannot build it ({err}); see timm.list_models('vit_*') "
                           "for names, and encoder.pretrained: timm (its own weights) or a checkpoint file") from None
    except FileNotFoundError as err:
        raise EncoderError(f"encoder.pretrained: {err}; give `timm` or an existing checkpoint file") from None
    data = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**data, is_training=False)
    if cfg.output == "cls_patch_mean":
        if getattr(model, "cls_token", None) is None:
            raise EncoderError(f"encoder.output: cls_patch_mean needs a ViT with a CLS token; timm's `{cfg.model}` "
                               "has none; use output: pooled")

        def forward(images: torch.Tensor) -> torch.Tensor:
            return cls_patch_mean(model.forward_features(images), model.num_prefix_tokens)
    else:
        forward = model
    height, width = data["input_size"][1:]
    center = data.get("crop_mode", "center") == "center" and height == width
    return Tower(model, forward, transform, {  # timm's eval geometry: shorter side to floor(size / crop_pct), crop
        "size": (height, width), "mean": data["mean"], "std": data["std"], "interpolation": data["interpolation"],
        "resize_mode": "shortest" if center else f"timm-{data.get('crop_mode')}",
        "resize_to": math.floor(height / data.get("crop_pct", 1.0)) if center else None})


# --- Hugging Face transformers ---------------------------------------------------------------

HF_VISION = {  # model_type -> (transformers class, has a CLS token, has a projection)
    "dinov2": ("Dinov2Model", True, False),
    "dinov2_with_registers": ("Dinov2WithRegistersModel", True, False),
    "clip": ("CLIPVisionModelWithProjection", True, True),
    "clip_vision_model": ("CLIPVisionModelWithProjection", True, True),
    "siglip": ("SiglipVisionModel", False, False),
    "siglip_vision_model": ("SiglipVisionModel", False, False),
    "siglip2": ("Siglip2VisionModel", False, False),
    "siglip2_vision_model": ("Siglip2VisionModel", False, False),
}


def _hf(cfg: EncoderConfig) -> Tower:
    try:
        import transformers
    except ImportError:
        raise EncoderError("encoder.source: hf needs transformers; pip install 'litpipe[hf]'") from None
    try:
        config = transformers.AutoConfig.from_pretrained(cfg.model)
        processor = transformers.AutoImageProcessor.from_pretrained(cfg.model)
    except (OSError, ValueError) as err:
        raise EncoderError(f"encoder.model `{cfg.model}`: transformers cannot load it ({err}); give a model folder "
                           "or a hub id (needs the network)") from None
    if config.model_type not in HF_VISION:
        raise EncoderError(f"encoder.model `{cfg.model}` is a `{config.model_type}` model; litpipe locks "
                           f"{', '.join(sorted(HF_VISION))} vision models")
    class_name, has_cls, projects = HF_VISION[config.model_type]
    if cfg.output == "projected" and not projects:
        raise EncoderError(f"encoder.output: projected: a {config.model_type} vision model has no projection; use "
                           "output: pooled" + (" or cls_patch_mean" if has_cls else ""))
    if cfg.output == "cls_patch_mean" and not has_cls:
        raise EncoderError(f"encoder.output: cls_patch_mean needs a CLS token; a {config.model_type} vision model has "
                           "none (it pools with its attention head); use output: pooled")
    model = getattr(transformers, class_name).from_pretrained(cfg.model)
    prefix_tokens = hf_prefix_tokens(model)

    def forward(images: torch.Tensor) -> torch.Tensor:
        out = model(pixel_values=images)
        if cfg.output == "projected":
            return out.image_embeds
        if cfg.output == "pooled":
            return out.pooler_output
        return cls_patch_mean(out.last_hidden_state, prefix_tokens)

    transform, preprocess_cfg = hf_transform(processor)
    return Tower(model, forward, transform, preprocess_cfg)


def hf_prefix_tokens(model) -> int:
    """How many tokens precede the patches in a transformers vision model's output: the CLS and any registers."""
    vision_config = getattr(model.config, "vision_config", model.config)
    return 1 + getattr(vision_config, "num_register_tokens", 0)


class FloorCenterCrop:
    """Centre crop with the offset rounded down, as transformers' processors crop (torchvision rounds half
    to even, one pixel off where the margin is odd): the `pil` path's parity with the processor."""

    def __init__(self, size: tuple[int, int]):
        self.size = size

    def __call__(self, image):
        height, width = self.size
        top, left = (image.height - height) // 2, (image.width - width) // 2
        return image.crop((left, top, left + width, top + height))

    def __repr__(self) -> str:
        return f"FloorCenterCrop(size={self.size})"


def hf_transform(processor) -> tuple[Any, dict]:
    """A Hugging Face image processor's eval settings as a PIL transform (resize by its rule and resample
    filter, centre crop, ToTensor, Normalize) and the settings for the fingerprint and the device path."""
    from transformers.image_utils import PILImageResampling

    resample = PILImageResampling(getattr(processor, "resample", PILImageResampling.BICUBIC))
    interpolation = {PILImageResampling.BICUBIC: "bicubic", PILImageResampling.BILINEAR: "bilinear"}.get(resample)
    if interpolation is None:
        raise EncoderError(f"encoder.model: its processor resizes with {resample.name}; litpipe follows bicubic or "
                           "bilinear processors")
    size = {k: _get(processor.size, k) for k in ("shortest_edge", "height", "width")}
    steps = []
    if size["shortest_edge"]:
        steps.append(T.Resize(size["shortest_edge"], InterpolationMode(interpolation)))
        resize_mode, final = "shortest", (size["shortest_edge"],) * 2
    else:
        steps.append(T.Resize((size["height"], size["width"]), InterpolationMode(interpolation)))
        resize_mode, final = "squash", (size["height"], size["width"])
    if getattr(processor, "do_center_crop", False):
        final = (_get(processor.crop_size, "height"), _get(processor.crop_size, "width"))
        steps.append(FloorCenterCrop(final))
    scale = float(getattr(processor, "rescale_factor", 1 / 255))
    if not math.isclose(scale, 1 / 255):
        raise EncoderError(f"encoder.model: its processor rescales by {scale}; litpipe follows processors that scale "
                           "by 1/255")
    mean, std = list(processor.image_mean), list(processor.image_std)
    transform = T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])
    return transform, {"size": final, "mean": mean, "std": std, "interpolation": interpolation,
                       "resize_mode": resize_mode, "resize_to": size["shortest_edge"], "crop": "floor"}


def _get(size, key: str):
    """A key of a processor's size: a dict on the slow processors, a SizeDict on the fast ones."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)

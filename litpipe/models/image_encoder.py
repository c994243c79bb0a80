"""The locked open_clip image tower: one definition for precompute, export and on-the-fly references.

Everything that decides what a cached embedding means lives here: the model and its weights, open_clip's
own eval transform (never a re-implementation), the stored output (projected or pooled), normalisation
and precision. `fingerprint` names all of it, so a cache is reused only by an identical encoder.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from litpipe.config import EncoderConfig
from litpipe.devices import autocast, resolve_device, resolve_precision
from litpipe.errors import UserError
from litpipe.models.pixels import PixelSteps


class EncoderError(UserError):
    """The encoder section cannot be turned into a model; the message says which key to fix."""


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


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every state_dict tensor in name order.

    Hashing tensors, not files, gives one answer for tags, checkpoint paths, hf-hub ids and seeded
    random init alike.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@dataclass
class EncoderDescription:
    """What a driver needs of the locked tower without holding it: the fingerprint that names its
    caches and the CPU pixel step its read tasks run (`Encoder.describe`)."""

    fingerprint: dict
    cpu_step: Any  # a CpuPixels

    @property
    def dim(self) -> int:
        return self.fingerprint["dim"]


@dataclass
class Encoder:
    """A frozen, eval-mode open_clip model with its eval transform; `encode` gives float32 embeddings."""

    model: torch.nn.Module
    preprocess: Any
    device: torch.device
    precision: str
    output: str
    normalize: bool
    pixels: PixelSteps  # the configured preprocessing path: CPU step in decode workers, device step here
    fingerprint: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return self.fingerprint["dim"]

    def describe(self) -> EncoderDescription:
        return EncoderDescription(self.fingerprint, self.pixels.cpu_step)

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.model.visual.preprocess_cfg["size"]
        return (size, size) if isinstance(size, int) else tuple(size)

    @torch.inference_mode()
    def embed_pixels(self, images: list[np.ndarray]) -> torch.Tensor:
        """uint8 [H, W, 3] images from `pixels.cpu_step` -> float32 embeddings [B, dim] on the CPU."""
        return self.encode(self.pixels.to_device(images, self.device))

    @torch.inference_mode()
    def encode(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Preprocessed images [B, 3, H, W] (on any device) -> float32 embeddings [B, dim] on the CPU."""
        images = torch.as_tensor(images, dtype=torch.float32)
        if images.device != self.device:
            images = (images.pin_memory() if self.device.type == "cuda" else images).to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(self.precision, self.device), self._pooled_output():
            features = self.model.encode_image(images)
        features = features.float()
        if self.normalize:
            features = torch.nn.functional.normalize(features, dim=-1)
        return features.cpu()

    @contextlib.contextmanager
    def _pooled_output(self):
        """For `output: pooled`, drop the tower's final projection for the duration of one forward."""
        if self.output != "pooled":
            yield
            return
        visual = self.model.visual
        proj, visual.proj = visual.proj, None
        try:
            yield
        finally:
            visual.proj = proj


def load_encoder(encoder_cfg: EncoderConfig, device: str | torch.device | None = None) -> Encoder:
    """Build the locked image tower of `encoder_cfg` on `device` (default: encoder.device)."""
    import open_clip

    device = torch.device(device) if device is not None else resolve_device(encoder_cfg.device, "encoder.device")
    if encoder_cfg.architecture is not None:
        if encoder_cfg.model in open_clip.list_models() and not is_registered_here(encoder_cfg.model):
            raise EncoderError(f"encoder.model `{encoder_cfg.model}` is a model open_clip ships, but encoder.architecture "
                               "is set too and would replace it under that name; remove encoder.architecture (set it "
                               f"to null) to use open_clip's {encoder_cfg.model}, or give the custom architecture a name "
                               "of its own in encoder.model")
        register_architecture(encoder_cfg.model, encoder_cfg.architecture)
    pretrained = encoder_cfg.pretrained
    hub = pretrained.startswith("hf-hub:") if pretrained else False
    if not pretrained:
        print(f"\n!!! litpipe: encoder `{encoder_cfg.model}` has NO pretrained weights: random init "
              f"(seed {encoder_cfg.seed}). Fine for tests and the demo, meaningless otherwise; "
              "set encoder.pretrained to a tag, checkpoint path or hf-hub: id. !!!\n", file=sys.stderr)
    overrides = dict(
        force_image_size=encoder_cfg.image_size,
        image_mean=tuple(encoder_cfg.image_mean) if encoder_cfg.image_mean else None,
        image_std=tuple(encoder_cfg.image_std) if encoder_cfg.image_std else None,
        image_interpolation=encoder_cfg.image_interpolation,
        image_resize_mode=encoder_cfg.image_resize_mode,
    )
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(encoder_cfg.seed)  # random init: the same weights in every process
            model, _, preprocess = open_clip.create_model_and_transforms(
                pretrained if hub else encoder_cfg.model, pretrained=None if hub else pretrained,
                device="cpu", **overrides,
            )
    except RuntimeError as err:
        raise EncoderError(f"encoder: cannot build `{encoder_cfg.model}` (pretrained={pretrained!r}): {err}; "
                           "check encoder.model against open_clip.list_models() and encoder.pretrained against "
                           "open_clip.list_pretrained(), or give encoder.architecture") from None
    if encoder_cfg.output == "pooled" and getattr(model.visual, "proj", None) is None:
        raise EncoderError(f"encoder.output: pooled needs an image tower with a separate `proj` "
                           f"(open_clip ViTs); `{encoder_cfg.model}` has none; use output: projected")
    sha = weights_sha256(model.visual)
    model.eval().requires_grad_(False)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    encoder = Encoder(model, preprocess, device, resolve_precision(encoder_cfg.precision, device),
                      encoder_cfg.output, encoder_cfg.normalize,
                      PixelSteps(preprocess, model.visual.preprocess_cfg, encoder_cfg.preprocess))
    pp = model.visual.preprocess_cfg
    size = encoder.image_size
    dim = encoder.encode(torch.zeros(1, 3, *size)).shape[1]
    encoder.fingerprint = {
        "model": encoder_cfg.model,
        "pretrained": pretrained,
        "weights_sha256": sha,
        "output": encoder_cfg.output,
        "normalize": encoder_cfg.normalize,
        # The configured precision, not the resolved one: the cache of an `auto` encoder made on GPUs is
        # found again from a CPU-only trainer. The resolved one is `Encoder.precision`.
        "precision": encoder_cfg.precision,
        "dim": int(dim),
        "preprocess": {
            "image_size": list(size),
            "mean": [float(m) for m in pp["mean"]],
            "std": [float(s) for s in pp["std"]],
            "interpolation": pp["interpolation"],
            "resize_mode": pp["resize_mode"],
            "pixels": encoder.pixels.describe(),
            "transform": repr(preprocess),
        },
        "spec": encoder_cfg.model_dump(exclude={"device"}),
    }
    return encoder

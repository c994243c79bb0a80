"""litpipe/models/image_encoder.py: the locked open_clip tower, its transform and its fingerprint."""

import io
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from conftest import TINY_ARCHITECTURE
from litpipe.config import EncoderConfig
from litpipe.files import content_digest
from litpipe.models.image_encoder import load_encoder
from litpipe.models.image_towers import EncoderError
from precompute_samples import TINY_MODEL, image_bytes


def tiny(**overrides) -> EncoderConfig:
    return EncoderConfig(model=TINY_MODEL, architecture=TINY_ARCHITECTURE, **overrides)


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(tiny(), device="cpu")


def test_random_init_is_seeded_so_every_process_gets_the_same_weights(encoder):
    again = load_encoder(tiny(), device="cpu")
    other_seed = load_encoder(tiny(seed=1), device="cpu")
    assert again.fingerprint == encoder.fingerprint
    assert other_seed.fingerprint["weights_sha256"] != encoder.fingerprint["weights_sha256"]
    for a, b in zip(encoder.model.visual.state_dict().values(), again.model.visual.state_dict().values()):
        assert torch.equal(a, b)


def test_model_is_frozen_in_eval_mode_with_open_clips_eval_transform(encoder):
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.model.parameters())
    assert TINY_MODEL in open_clip.list_models()
    assert repr(encoder.preprocess) == encoder.fingerprint["preprocess"]["transform"]
    assert "RandomResizedCrop" not in repr(encoder.preprocess)


def test_fingerprint_names_weights_output_and_every_preprocessing_setting(encoder):
    fp = encoder.fingerprint
    assert set(fp) == {"source", "model", "pretrained", "weights_sha256", "output", "normalize", "precision", "dim",
                       "preprocess", "spec"}
    assert fp["dim"] == TINY_ARCHITECTURE["embed_dim"]
    assert fp["preprocess"]["image_size"] == [32, 32]
    assert "device" not in fp["spec"]
    changed = load_encoder(tiny(image_interpolation="bilinear", image_mean=[0.5, 0.5, 0.5]), device="cpu").fingerprint
    assert changed["preprocess"]["interpolation"] == "bilinear" and changed["preprocess"]["mean"] == [0.5] * 3
    assert changed["weights_sha256"] == fp["weights_sha256"]


def test_checkpoint_path_loads_those_weights_whatever_the_seed(encoder, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(encoder.model.state_dict(), path)
    loaded = load_encoder(tiny(pretrained=str(path), seed=7), device="cpu")
    assert loaded.fingerprint["weights_sha256"] == encoder.fingerprint["weights_sha256"]
    assert loaded.fingerprint["pretrained"] == content_digest(str(path))  # the file by its bytes, not its path
    moved = Path(shutil.copy(path, tmp_path / "elsewhere.pt"))
    assert load_encoder(tiny(pretrained=str(moved), seed=7), device="cpu").fingerprint == loaded.fingerprint


def test_encode_equals_open_clip_encode_image_on_preprocessed_images(encoder):
    images = [Image.open(io.BytesIO(image_bytes(i))) for i in range(3)]
    batch = torch.stack([encoder.preprocess(im) for im in images])
    with torch.no_grad():
        direct = encoder.model.encode_image(batch)
    got = encoder.encode(batch.numpy())
    assert got.dtype == torch.float32 and got.shape == (3, 32)
    torch.testing.assert_close(got, direct, rtol=0, atol=0)


def test_pooled_output_is_the_features_before_the_projection(encoder):
    pooled_encoder = load_encoder(tiny(output="pooled"), device="cpu")
    batch = torch.stack([encoder.preprocess(Image.open(io.BytesIO(image_bytes(i)))) for i in range(2)])
    pooled = pooled_encoder.encode(batch).double()
    assert pooled.shape == (2, TINY_ARCHITECTURE["vision_cfg"]["width"])
    projected = pooled @ pooled_encoder.model.visual.proj.detach().double()  # float64 reference
    np.testing.assert_allclose(encoder.encode(batch).double().numpy(), projected.numpy(), rtol=1e-5, atol=1e-5)


def test_normalize_gives_unit_vectors():
    normalized = load_encoder(tiny(normalize=True), device="cpu")
    out = normalized.encode(torch.randn(4, 3, 32, 32))
    np.testing.assert_allclose(out.double().norm(dim=1).numpy(), np.ones(4), atol=1e-6)


def test_unknown_model_error_names_the_key_and_the_fix():
    with pytest.raises(EncoderError, match="encoder.model"):
        load_encoder(EncoderConfig(model="no-such-model-xyz"), device="cpu")


def test_a_shipped_model_name_with_a_custom_architecture_is_refused_naming_both_keys():
    """`encoder.model: ViT-L-14` with the demo's `architecture` left in would build the demo's tiny
    model and label its cache ViT-L-14."""
    with pytest.raises(EncoderError, match="encoder.model `ViT-L-14` is a model open_clip ships, but "
                                           "encoder.architecture is set too.*remove encoder.architecture"):
        load_encoder(EncoderConfig(model="ViT-L-14", architecture=TINY_ARCHITECTURE), device="cpu")

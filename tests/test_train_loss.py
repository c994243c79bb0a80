"""Chunked global losses and GradCache against the naive full-batch computation, in float64."""

import pytest
import torch
import torch.nn.functional as F

from litpipe.models.text_tower import TextTower
from litpipe.train_text.grad_cache import full_backward, grad_cached_backward
from litpipe.train_text.loss import global_contrastive_loss


def naive_loss(text, images, logit_scale, logit_bias, kind):
    """The textbook N x N computation: the independent reference."""
    logits = logit_scale.exp() * text @ images.T
    labels = torch.arange(text.shape[0])
    if kind == "softmax":
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    signs = 2 * torch.eye(text.shape[0], dtype=text.dtype) - 1
    return -F.logsigmoid(signs * (logits + logit_bias)).sum() / text.shape[0]


def naive_multi_positive_loss(text, images, owner, logit_scale, logit_bias, kind):
    """The M texts x B images computation, every caption of an image a positive (docs: train_text/loss.py)."""
    logits = logit_scale.exp() * text @ images.T
    mine = owner[:, None] == torch.arange(images.shape[0])[None, :]
    if kind == "softmax":
        text_to_image = F.cross_entropy(logits, owner)
        image_to_text = -(logits.log_softmax(dim=0) * mine).sum(0) / mine.sum(0)  # the mean over each image's captions
        return 0.5 * (text_to_image + image_to_text.mean())
    return -F.logsigmoid(torch.where(mine, 1.0, -1.0) * (logits + logit_bias)).sum() / text.shape[0]


def captions_per_image(images: int, seed: int) -> torch.Tensor:
    """Each text's image: 1 to 4 captions per image, shuffled (a batch lists them in any order)."""
    g = torch.Generator().manual_seed(seed)
    owner = torch.repeat_interleave(torch.arange(images), torch.randint(1, 5, (images,), generator=g))
    return owner[torch.randperm(len(owner), generator=g)]


def tiny_tower():
    torch.manual_seed(0)
    cfg = dict(width=32, layers=1, heads=2, context_length=12, vocab_size=500)
    return TextTower(cfg, embed_dim=24, init_temperature=10.0, init_bias=-3.0).double()


def batch(n=37, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 498, (n, 12), generator=g)
    tokens[:, -1] = 499  # argmax pooling reads the end token
    images = F.normalize(torch.randn(n, 24, generator=g, dtype=torch.float64), dim=-1)
    return tokens, images


def grads(module):
    return {k: torch.zeros_like(p) if p.grad is None else p.grad.clone() for k, p in module.named_parameters()}


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_chunked_loss_and_feature_gradients_equal_naive(kind):
    text = F.normalize(torch.randn(53, 16, dtype=torch.float64), dim=-1).requires_grad_()
    images = F.normalize(torch.randn(53, 16, dtype=torch.float64), dim=-1)
    scale = torch.tensor(2.3, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-4.0, dtype=torch.float64, requires_grad=True)
    expected = naive_loss(text, images, scale, bias, kind)
    expected_grads = torch.autograd.grad(expected, (text, scale, bias), allow_unused=True, materialize_grads=True)
    got = global_contrastive_loss(text, images, scale, bias, kind, chunk_size=7)
    got_grads = torch.autograd.grad(got, (text, scale, bias))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_loss_and_gradients_ignore_the_norms_of_the_cached_image_vectors(kind):
    """The cache holds raw vectors; the loss sees them on the unit sphere, as eval does, so scaling
    any image row by a positive factor changes nothing (and the naive loss on unit rows agrees)."""
    g = torch.Generator().manual_seed(5)
    text = F.normalize(torch.randn(29, 16, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    raw = torch.randn(29, 16, generator=g, dtype=torch.float64) * 7
    scaled = raw * torch.rand(29, 1, generator=g, dtype=torch.float64).mul(50).add(0.01)
    scale = torch.tensor(2.3, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-4.0, dtype=torch.float64, requires_grad=True)
    results = []
    for images in (raw, scaled):
        loss = global_contrastive_loss(text, images, scale, bias, kind, chunk_size=6)
        results.append((loss, *torch.autograd.grad(loss, (text, scale, bias))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[0][0], naive_loss(text, F.normalize(raw, dim=-1), scale, bias, kind),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_grad_cached_step_equals_naive_full_batch_gradients_of_the_tower(kind):
    tokens, images = batch()
    reference = tiny_tower()
    naive_loss(reference(tokens), images, reference.logit_scale, reference.logit_bias, kind).backward()
    for cached in (True, False):
        tower = tiny_tower()
        loss_fn = lambda f: global_contrastive_loss(f, images, tower.logit_scale, tower.logit_bias, kind, chunk_size=5)
        if cached:
            loss = grad_cached_backward(tower, tokens, 8, loss_fn)
        else:
            loss = full_backward(tower, tokens, loss_fn)
        torch.testing.assert_close(loss, naive_loss(reference(tokens), images, reference.logit_scale, reference.logit_bias, kind))
        ref_grads = grads(reference)
        for name, g in grads(tower).items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-9, atol=1e-12, msg=name)


def test_grad_cache_replays_dropout_masks_of_the_first_pass():
    tokens, images = batch(n=20)
    tower = tiny_tower()
    embed = lambda t: F.normalize(F.dropout(tower.text(t), p=0.5, training=True), dim=-1)
    loss_fn = lambda f: global_contrastive_loss(f, images, tower.logit_scale, tower.logit_bias, "softmax", chunk_size=6)
    torch.manual_seed(7)
    loss = grad_cached_backward(embed, tokens, 6, loss_fn)
    cached = grads(tower)
    tower.zero_grad()
    torch.manual_seed(7)  # the reference draws the same masks chunk by chunk, keeping activations
    features = torch.cat([embed(c) for c in tokens.split(6)])
    expected = naive_loss(features, images, tower.logit_scale, tower.logit_bias, "softmax")
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    for name, g in grads(tower).items():
        torch.testing.assert_close(cached[name], g, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_several_captions_per_image_as_positives_equal_the_naive_loss_with_image_gradients(kind):
    """Every caption of an image a positive; the image rows carry gradient (an image head), any norm."""
    g = torch.Generator().manual_seed(3)
    owner = captions_per_image(31, seed=4)
    text = F.normalize(torch.randn(len(owner), 16, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    images = (torch.randn(31, 16, generator=g, dtype=torch.float64) * 3).requires_grad_()
    scale = torch.tensor(2.3, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-4.0, dtype=torch.float64, requires_grad=True)
    inputs = (text, images, scale, bias)
    expected = naive_multi_positive_loss(text, F.normalize(images, dim=-1), owner, scale, bias, kind)
    expected_grads = torch.autograd.grad(expected, inputs, allow_unused=True, materialize_grads=True)
    got = global_contrastive_loss(text, images, scale, bias, kind, chunk_size=7, owner=owner)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for name, a, e in zip(("text", "images", "scale", "bias"), torch.autograd.grad(got, inputs), expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_one_caption_per_image_is_todays_loss(kind):
    g = torch.Generator().manual_seed(6)
    text = F.normalize(torch.randn(23, 16, generator=g, dtype=torch.float64), dim=-1)
    images = F.normalize(torch.randn(23, 16, generator=g, dtype=torch.float64), dim=-1)
    scale, bias = torch.tensor(2.3, dtype=torch.float64), torch.tensor(-4.0, dtype=torch.float64)
    identity = torch.arange(23)
    expected = naive_loss(text, images, scale, bias, kind)
    torch.testing.assert_close(naive_multi_positive_loss(text, images, identity, scale, bias, kind), expected)
    torch.testing.assert_close(global_contrastive_loss(text, images, scale, bias, kind, 5, owner=identity), expected)

"""Contrastive losses over the global batch, in row chunks: the N x N logits never exist.

Both losses are computed with their gradients in closed form, chunk by chunk (peak extra memory
O(chunk x N)), inside one autograd Function. Each rank passes its own L2-normalised text
features and its raw cached image embeddings, which are L2-normalised here, always, as in LiT,
CLIP and eval (a raw vector's norm would act as a per-image temperature); every rank's text
features and image embeddings are gathered without gradient. The
returned loss is the global loss (identical on every rank); its backward yields, for this rank,
the gradient of the global loss with respect to its own text rows and this rank's share of the
logit-scale/bias gradient, so summing parameter gradients over ranks gives the exact global
gradient (`gather.sum_gradients`).

softmax: symmetric InfoNCE (CLIP/LiT), mean over the N rows and N columns, logits = s t.x.
sigmoid: SigLIP, sum over all N x N pairs of -log sigmoid(z (s t.x + b)), divided by N.
s = exp(logit_scale).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from litpipe.train_text.gather import gather_rows, sum_over_ranks, world


def global_contrastive_loss(text: torch.Tensor, images: torch.Tensor, logit_scale: torch.Tensor,
                            logit_bias: torch.Tensor, kind: str = "softmax", chunk_size: int = 4096) -> torch.Tensor:
    """The global batch's loss; `text` (unit rows) and `images` (any norm) are this rank's rows."""
    return _GlobalLoss.apply(text, images, logit_scale, logit_bias, kind, chunk_size)


class _GlobalLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, text, images, logit_scale, logit_bias, kind, chunk_size):
        rank, _ = world()
        texts_all, images_all = gather_rows(text), gather_rows(F.normalize(images.detach().to(text.dtype), dim=-1))
        local = slice(rank * text.shape[0], (rank + 1) * text.shape[0])
        step = _softmax_terms if kind == "softmax" else _sigmoid_terms
        loss, d_text, d_scale, d_bias = step(texts_all, images_all, local, logit_scale.detach(), logit_bias.detach(), chunk_size)
        ctx.save_for_backward(d_text, d_scale, d_bias)
        return sum_over_ranks(loss)

    @staticmethod
    def backward(ctx, grad_out):
        d_text, d_scale, d_bias = ctx.saved_tensors
        return d_text * grad_out, None, d_scale * grad_out, d_bias * grad_out, None, None


def _softmax_terms(texts, images, local, logit_scale, _bias, chunk):
    """This rank's share of the InfoNCE loss, d/d(local texts), d/d(logit_scale)."""
    n, s = texts.shape[0], logit_scale.exp()
    t_local, x_local = texts[local], images[local]
    lse_row = _chunked_lse(t_local, images, s, chunk)   # text -> image, this rank's rows
    lse_col = gather_rows(_chunked_lse(x_local, texts, s, chunk))  # image -> text, every column
    diag = (t_local * x_local).sum(-1)
    loss = 0.5 * (lse_row.sum() + lse_col[local].sum()) / n - s * diag.sum() / n
    d_text = torch.empty_like(t_local)
    d_s = texts.new_zeros(())
    for a in range(0, t_local.shape[0], chunk):
        dots = t_local[a : a + chunk] @ images.T
        weights = (torch.exp(s * dots - lse_row[a : a + chunk, None]) + torch.exp(s * dots - lse_col[None, :])) * (0.5 / n)
        d_text[a : a + chunk] = s * (weights @ images - x_local[a : a + chunk] / n)
        d_s += (weights * dots).sum()
    d_s -= diag.sum() / n
    return loss, d_text, (d_s * s).to(logit_scale.dtype), torch.zeros_like(logit_scale)


def _sigmoid_terms(texts, images, local, logit_scale, logit_bias, chunk):
    """This rank's rows of the SigLIP loss, d/d(local texts), d/d(logit_scale), d/d(bias)."""
    n, s, b = texts.shape[0], logit_scale.exp(), logit_bias
    t_local = texts[local]
    loss, d_s, d_b = texts.new_zeros(()), texts.new_zeros(()), texts.new_zeros(())  # on the features' device
    d_text = torch.empty_like(t_local)
    for a in range(0, t_local.shape[0], chunk):
        dots = t_local[a : a + chunk] @ images.T
        logits = s * dots + b
        rows = torch.arange(a, a + dots.shape[0], device=logits.device)
        positive = torch.zeros_like(logits, dtype=torch.bool)
        positive[rows - a, rows + local.start] = True
        loss += F.softplus(torch.where(positive, -logits, logits)).sum() / n
        err = (torch.sigmoid(logits) - positive.to(logits.dtype)) / n
        d_text[a : a + chunk] = s * (err @ images)
        d_s += (err * dots).sum()
        d_b += err.sum()
    return loss, d_text, (d_s * s).to(logit_scale.dtype), d_b.to(logit_bias.dtype)


def _chunked_lse(queries, keys, s, chunk):
    """logsumexp_j(s q_i . k_j) for each query row, `chunk` rows at a time."""
    return torch.cat([torch.logsumexp(s * (queries[a : a + chunk] @ keys.T), dim=1) for a in range(0, queries.shape[0], chunk)])

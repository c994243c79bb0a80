"""Contrastive losses over the global batch, in row chunks: the M x B logits never exist.

Both losses are computed with their gradients in closed form, chunk by chunk (peak extra memory
O(chunk x batch)), inside one autograd Function. Each rank passes its own L2-normalised text
features, its image vectors (L2-normalised here, always, as in LiT, CLIP and eval: a raw vector's
norm would act as a per-image temperature) and each text's image on this rank (`owner`). Every
rank's rows are gathered without gradient. The returned loss is the global loss (identical on every
rank); its backward yields, for this rank, the gradient of the global loss with respect to its own
text rows, its own image rows (when they carry gradient: an image head), and this rank's share of
the logit-scale/bias gradient, so summing parameter gradients over ranks gives the exact global
gradient (`gather.sum_gradients`).

The global batch holds B images and M texts; text i belongs to image g(i), image j owns the
c_j >= 1 texts P_j (several captions of one image are all positives). s = exp(logit_scale),
d_ij = t_i . x_j.

softmax: 0.5 [ (1/M) sum_i -log softmax_j(s d_ij)[g(i)]
             + (1/B) sum_j -(1/c_j) sum_{i in P_j} log softmax_i(s d_ij)[i] ]
         (text -> image: one positive image per text; image -> text: the mean over its captions
         of a softmax over all M texts, SupCon's "outside" form). With one text per image it is
         CLIP's and LiT's symmetric InfoNCE.
sigmoid: SigLIP, (1/M) sum over all M x B pairs of -log sigmoid(z_ij (s d_ij + b)),
         z_ij = 1 where j = g(i), else -1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from litpipe.train_text.gather import gather_rows, sum_over_ranks, world


def global_contrastive_loss(text: torch.Tensor, images: torch.Tensor, logit_scale: torch.Tensor,
                            logit_bias: torch.Tensor, kind: str = "softmax", chunk_size: int = 4096,
                            owner: torch.Tensor | None = None) -> torch.Tensor:
    """The global batch's loss; `text` (unit rows) and `images` (any norm) are this rank's rows, `owner`
    [texts] each text's image row on this rank (none: text i belongs to image i)."""
    if owner is None:
        owner = torch.arange(text.shape[0], device=text.device)
    images = F.normalize(images.to(text.dtype), dim=-1)  # in autograd: an image head's gradient passes through
    return _GlobalLoss.apply(text, images, logit_scale, logit_bias, owner, kind, chunk_size)


class _GlobalLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, text, images, logit_scale, logit_bias, owner, kind, chunk_size):
        batch = _Batch(text, images, owner)
        step = _softmax_terms if kind == "softmax" else _sigmoid_terms
        loss, d_text, d_images, d_scale, d_bias = step(batch, logit_scale.detach(), logit_bias.detach(), chunk_size,
                                                       ctx.needs_input_grad[1])
        ctx.save_for_backward(d_text, d_images, d_scale, d_bias)
        return sum_over_ranks(loss)

    @staticmethod
    def backward(ctx, grad_out):
        d_text, d_images, d_scale, d_bias = ctx.saved_tensors
        if not bool(grad_out == 1):  # loss.backward(), as GradCache calls it, takes d_text itself: no [M, D] copy
            d_text, d_images = d_text * grad_out, d_images * grad_out
        return d_text, d_images if ctx.needs_input_grad[1] else None, d_scale * grad_out, d_bias * grad_out, None, None, None


class _Batch:
    """The global batch gathered from every rank, and where this rank's rows sit in it."""

    def __init__(self, text: torch.Tensor, images: torch.Tensor, owner: torch.Tensor):
        rank, _ = world()
        self.images, self.image_sizes = gather_rows(images)
        self.texts, self.text_sizes = gather_rows(text)
        image_start, text_start = sum(self.image_sizes[:rank]), sum(self.text_sizes[:rank])
        self.owner = gather_rows(owner + image_start, self.text_sizes)[0]  # each text's image, as a global row
        self.local_texts = slice(text_start, text_start + text.shape[0])
        self.local_images = slice(image_start, image_start + images.shape[0])
        self.counts = torch.bincount(self.owner, minlength=self.images.shape[0]).to(text.dtype)  # c_j
        if bool((self.counts == 0).any()):
            raise ValueError("every image needs at least one text in the batch")

    def positives_sum(self, rows: slice, weights: torch.Tensor) -> torch.Tensor:
        """sum_{i in P_j} weights_i t_i for the images j in `rows`."""
        sums = torch.zeros(self.images.shape[0], self.texts.shape[1], dtype=self.texts.dtype, device=self.texts.device)
        return sums.index_add_(0, self.owner, self.texts * weights[:, None])[rows]


def _softmax_terms(b: _Batch, logit_scale, _bias, chunk, image_grads):
    """This rank's share of the InfoNCE loss, d/d(local texts), d/d(local images), d/d(logit_scale)."""
    m, n, s = b.texts.shape[0], b.images.shape[0], logit_scale.exp()
    t_local, x_local, owner = b.texts[b.local_texts], b.images[b.local_images], b.owner[b.local_texts]
    lse_row = _chunked_lse(t_local, b.images, s, chunk)  # text -> image, this rank's texts
    lse_col_local = _chunked_lse(x_local, b.texts, s, chunk)  # image -> text, this rank's images
    lse_col = gather_rows(lse_col_local, b.image_sizes)[0]
    positive_dots = torch.cat([(t_local[a : a + chunk] * b.images[owner[a : a + chunk]]).sum(-1)  # no [M, D] copies
                               for a in range(0, t_local.shape[0], chunk)])
    # each text's weight as a positive: 1/M in its own row, 1/(B c_j) in its image's column
    positive_weight = 0.5 * (1 / m + 1 / (n * b.counts[owner]))
    loss = 0.5 * (lse_row.sum() / m + lse_col_local.sum() / n) - s * (positive_weight * positive_dots).sum()
    d_text = torch.empty_like(t_local)
    d_s = -(positive_weight * positive_dots).sum()
    for a in range(0, t_local.shape[0], chunk):  # in place: three [chunk, B] blocks alive at most
        dots = t_local[a : a + chunk] @ b.images.T
        weights = (dots * s).sub_(lse_row[a : a + chunk, None]).exp_().div_(2 * m)
        weights += (dots * s).sub_(lse_col[None, :]).exp_().div_(2 * n)
        d_text[a : a + chunk] = s * (weights @ b.images - positive_weight[a : a + chunk, None] * b.images[owner[a : a + chunk]])
        d_s += torch.dot(weights.view(-1), dots.view(-1))
    d_images = torch.zeros(())
    if image_grads:
        lse_row_all = gather_rows(lse_row, b.text_sizes)[0]
        all_weights = 0.5 * (1 / m + 1 / (n * b.counts[b.owner]))
        positives = b.positives_sum(b.local_images, all_weights)
        d_images = torch.empty_like(x_local)
        for a in range(0, x_local.shape[0], chunk):
            dots = x_local[a : a + chunk] @ b.texts.T
            weights = 0.5 * (torch.exp(s * dots - lse_row_all[None, :]) / m
                             + torch.exp(s * dots - lse_col_local[a : a + chunk, None]) / n)
            d_images[a : a + chunk] = s * (weights @ b.texts - positives[a : a + chunk])
    return loss, d_text, d_images, (d_s * s).to(logit_scale.dtype), torch.zeros_like(logit_scale)


def _sigmoid_terms(b: _Batch, logit_scale, logit_bias, chunk, image_grads):
    """This rank's texts' rows of the SigLIP loss, d/d(local texts), d/d(local images), d/d(scale), d/d(bias)."""
    m, s = b.texts.shape[0], logit_scale.exp()
    t_local, owner = b.texts[b.local_texts], b.owner[b.local_texts]
    columns = torch.arange(b.images.shape[0], device=b.images.device)
    loss, d_s, d_b = t_local.new_zeros(()), t_local.new_zeros(()), t_local.new_zeros(())  # on the features' device
    d_text = torch.empty_like(t_local)
    for a in range(0, t_local.shape[0], chunk):  # in place: three [chunk, B] blocks alive at most
        dots = t_local[a : a + chunk] @ b.images.T
        logits = (dots * s).add_(logit_bias)
        texts, positives = torch.arange(len(logits), device=logits.device), owner[a : a + chunk]
        # -log sigmoid(-x) = softplus(x) for the negatives; for the one positive of each row softplus(-x) = softplus(x) - x
        loss += (F.softplus(logits).sum() - logits[texts, positives].sum()) / m
        err = logits.sigmoid_()
        err[texts, positives] -= 1
        err /= m
        d_text[a : a + chunk] = s * (err @ b.images)
        d_s += torch.dot(err.view(-1), dots.view(-1))
        d_b += err.sum()
    d_images = torch.zeros(())
    if image_grads:
        x_local, rows = b.images[b.local_images], columns[b.local_images]
        d_images = torch.empty_like(x_local)
        for a in range(0, x_local.shape[0], chunk):
            dots = x_local[a : a + chunk] @ b.texts.T
            positive = rows[a : a + chunk, None] == b.owner[None, :]
            err = (torch.sigmoid(s * dots + logit_bias) - positive.to(dots.dtype)) / m
            d_images[a : a + chunk] = s * (err @ b.texts)
    return loss, d_text, d_images, (d_s * s).to(logit_scale.dtype), d_b.to(logit_bias.dtype)


def _chunked_lse(queries, keys, s, chunk):
    """logsumexp_j(s q_i . k_j) for each query row, `chunk` rows at a time."""
    return torch.cat([torch.logsumexp(s * (queries[a : a + chunk] @ keys.T), dim=1) for a in range(0, queries.shape[0], chunk)])

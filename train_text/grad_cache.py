"""GradCache: a batch's gradient with peak activation memory set by the chunk, not the batch.

1. embed every chunk without autograd (no activations kept), recording the RNG state before each;
2. the loss and its gradient with respect to the embeddings (and to the loss's own parameters);
3. re-embed chunk by chunk with autograd, under the recorded RNG state (same dropout masks), and
   backpropagate that chunk's cached embedding gradient.
The parameter gradients equal one backward through the whole batch.
"""

from __future__ import annotations

from typing import Callable

import torch


def grad_cached_backward(embed: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, chunk_size: int,
                         loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Accumulate d loss_fn(embed(inputs)) / d params into `.grad`; return the loss."""
    chunks = inputs.split(chunk_size)
    states, features = [], None
    with torch.no_grad():
        for start, chunk in zip(range(0, len(inputs), chunk_size), chunks):
            states.append(_rng_state())
            out = embed(chunk)
            if features is None:  # filled in place: a list of chunks and their concatenation would hold it twice
                features = out.new_empty((len(inputs), *out.shape[1:]))
            features[start : start + len(out)] = out
    after = _rng_state()
    features.requires_grad_()
    loss = loss_fn(features)
    loss.backward()
    for chunk, state, grad in zip(chunks, states, features.grad.split(chunk_size)):
        _set_rng_state(state)
        embed(chunk).backward(grad)
    _set_rng_state(after)
    return loss.detach()


def full_backward(embed: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor,
                  loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The same step with one forward keeping every activation (train.grad_cache: false)."""
    features = embed(inputs)
    loss = loss_fn(features)
    loss.backward()
    return loss.detach()


def _rng_state():
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _set_rng_state(state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])

"""The one cross-rank path: gather rows without gradient, sum tensors. World size 1 = no-ops.

Gradients never travel through a gather: each rank's loss step returns the gradient of the
*global* loss with respect to its own rows (and its share of the temperature/bias gradient),
so one all-reduce SUM of every parameter's gradient after backward gives the exact gradient of
one process on the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(x: torch.Tensor, sizes: list[int] | None = None) -> tuple[torch.Tensor, list[int]]:
    """Every rank's `x` concatenated in rank order, detached, and each rank's row count. Ranks may hold
    different numbers of rows (several captions per image): rows are padded to the largest for the
    all_gather and cut back. `sizes` (from an earlier gather of as many rows) saves asking for them."""
    _, size = world()
    x = x.detach().contiguous()
    if size == 1:
        return x, [x.shape[0]]
    if sizes is None:
        counts = [torch.zeros(1, dtype=torch.int64, device=x.device) for _ in range(size)]
        dist.all_gather(counts, torch.tensor([x.shape[0]], device=x.device))
        sizes = [int(c) for c in counts]
    longest = max(sizes)
    padded = torch.cat([x, x.new_zeros(longest - x.shape[0], *x.shape[1:])]) if x.shape[0] < longest else x
    out = padded.new_empty((size * longest, *padded.shape[1:]))  # gathered in place: no list of parts to concatenate
    dist.all_gather_into_tensor(out, padded)
    if all(n == longest for n in sizes):
        return out, sizes
    rows = torch.cat([torch.arange(r * longest, r * longest + n, device=x.device) for r, n in enumerate(sizes)])
    return out[rows], sizes


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """In-place all-reduce SUM (returns `x`)."""
    if world()[1] > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def barrier() -> None:
    """Wait for every rank (no-op alone): what rank 0 prepared is there for all after it."""
    if world()[1] > 1:
        dist.barrier()


def sum_gradients(parameters) -> None:
    """Turn each rank's partial gradients into the global gradient (flattened, one all-reduce)."""
    if world()[1] == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()

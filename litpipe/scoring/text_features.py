"""Captions and prompts -> text-tower features (unit length: the tower normalises), in batches, with progress."""

from __future__ import annotations

import torch
from litpipe.progress import progress


@torch.inference_mode()
def encode_texts(tower: torch.nn.Module, tokenizer, texts: list[str], batch_size: int = 512,
                 device: str | torch.device = "cpu", desc: str = "text features") -> torch.Tensor:
    """float32 [len(texts), D] on the CPU."""
    out = []
    with progress(total=len(texts), desc=desc, unit="text", unit_scale=True, disable=len(texts) < 4 * batch_size) as bar:
        for start in range(0, len(texts), batch_size):
            batch = texts[start:start + batch_size]
            tokens = tokenizer(batch).to(device)
            out.append(tower(tokens).float().cpu())
            bar.update(len(batch))
    dim = getattr(tower, "embed_dim", 0)
    return torch.cat(out) if out else torch.empty(0, dim)

"""The demo's pretrained image tower, made the way LiT's towers are: supervised pretraining on labelled images.

LiT locks an image tower pretrained on labelled images (JFT, ImageNet-21k). No weights can be
downloaded here, so `litpipe demo-data` makes one the same way: a small open_clip ViT trained to
classify the Unicode emoji subgroup (~100 classes) of the *training* emoji only, so the held-out
emoji stay unseen, its inputs through open_clip's own eval transform. The result is an ordinary
open_clip checkpoint (the whole CLIP model's state_dict; the text half at its seeded init, unused)
that `encoder.pretrained` loads like any other. A fixed seed, deterministic ops and a fixed thread
count make a rebuild write the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from litpipe.config import DatasetConfig
from litpipe.models.image_towers import register_architecture
from litpipe.sources import read_tar

MODEL = "litpipe-demo-vit"  # pipeline.yaml's encoder.model and encoder.architecture must be these two
ARCHITECTURE = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 128, "layers": 3, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}
CHECKPOINT = "image_tower.pt"
EPOCHS, BATCH_SIZE, LR, WEIGHT_DECAY = 4, 128, 2e-3, 0.05
THREADS = 2  # matmul results depend on the thread count; fixed, so every machine writes the same bytes


def recipe(seed: int) -> dict:
    """Everything the checkpoint's bytes depend on besides the training shards: a change rebuilds it."""
    return {"model": MODEL, "architecture": ARCHITECTURE, "epochs": EPOCHS, "batch_size": BATCH_SIZE, "lr": LR,
            "weight_decay": WEIGHT_DECAY, "seed": seed, "torch": version("torch"),
            "open_clip": version("open_clip_torch")}


def build_tower(out: Path, train_shards: list[Path], seed: int = 0) -> dict:
    """Pretrain the tower on the subgroups of the images in `train_shards`; write `out/CHECKPOINT`.
    Returns its record for the demo's done-marker (recipe, sha256 of the file, training accuracy)."""
    import open_clip

    register_architecture(MODEL, ARCHITECTURE)
    with _deterministic(seed):
        model, _, preprocess = open_clip.create_model_and_transforms(MODEL)
        images, labels, subgroups = _labelled_images(train_shards, preprocess)
        head = torch.nn.Linear(ARCHITECTURE["embed_dim"], len(subgroups))
        accuracy = _fit(model.visual, head, images, labels, seed)
    buffer = io.BytesIO()  # saved in memory: torch.save names the archive after a file, and a temp name would differ
    torch.save(model.state_dict(), buffer)
    data = buffer.getvalue()
    tmp = out / f".{CHECKPOINT}.tmp"
    tmp.write_bytes(data)
    tmp.replace(out / CHECKPOINT)
    print(f"demo data: pretrained image tower {out / CHECKPOINT}: {len(subgroups)} subgroups of {len(labels)} training "
          f"images, {EPOCHS} epochs, training accuracy {accuracy:.1%}")
    return {"checkpoint": CHECKPOINT, "sha256": hashlib.sha256(data).hexdigest(), "recipe": recipe(seed),
            "classes": len(subgroups), "images": len(labels), "train_accuracy": round(accuracy, 4)}


@contextlib.contextmanager
def _deterministic(seed: int):
    """Seeded, deterministic, on THREADS threads; the caller's RNG, thread count and algorithm choice come back."""
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(THREADS)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(strict)
            torch.set_num_threads(threads)


def _labelled_images(shards: list[Path], preprocess) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Every training image through open_clip's eval transform, and its subgroup's index (subgroups sorted)."""
    dataset = DatasetConfig(format="webdataset", urls=[str(s) for s in shards])
    samples = [s for shard in shards for s in read_tar(dataset, str(shard)) if s.error is None]
    subgroups = sorted({s.metadata["subgroup"] for s in samples})
    images = torch.stack([preprocess(Image.open(io.BytesIO(s.image)).convert("RGB")) for s in samples])
    labels = torch.tensor([subgroups.index(s.metadata["subgroup"]) for s in samples])
    return images, labels, subgroups


def _fit(visual: torch.nn.Module, head: torch.nn.Linear, images: torch.Tensor, labels: torch.Tensor, seed: int) -> float:
    """Cross-entropy of a linear head on the embedding; AdamW, one-cycle schedule. Returns the accuracy
    over the last epoch."""
    params = [*visual.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = -(-len(labels) // BATCH_SIZE)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, LR, total_steps=EPOCHS * steps_per_epoch, pct_start=0.1)
    order = torch.Generator().manual_seed(seed)
    visual.train()
    for _ in range(EPOCHS):
        correct = 0
        for rows in torch.randperm(len(labels), generator=order).split(BATCH_SIZE):
            logits = head(visual(images[rows]))
            loss = F.cross_entropy(logits, labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            correct += (logits.argmax(dim=1) == labels[rows]).sum().item()
    visual.eval()
    return correct / len(labels)

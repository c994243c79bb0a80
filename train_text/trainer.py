"""The training loop: cached image embeddings in, a text tower (or head-only training's heads) out.

One loop for one process and for each Ray Train worker (rank/world come from torch.distributed).
Every step: this rank's slice of the global batch from the store's reader, one caption per image
picked by a generator seeded by (seed, step, rank) (or every caption, `train.positives: all`), as
token ids from the token cache or tokenised in a background thread, or, with `train.text_model`,
as the frozen text model's cached features, which only heads see (no tower runs) (`text_batches`);
then `train_step`: the global contrastive loss and its gradient (GradCache or one full backward),
gradients summed over ranks, clipping, AdamW, warmup + cosine. `fit` is the loop around it and its
bookkeeping (logs, evaluation, checkpoints, the final tower). Checkpoints hold everything needed to
continue the same loss trajectory: weights, optimiser, scheduler, RNG states and the global step
(epoch and position follow from it, because the reader's order is a pure function of seed and epoch).
"""

from __future__ import annotations

import io
import json
import math
import pickle
import random
import time
from dataclasses import dataclass
from typing import Callable

import fsspec
import numpy as np
import torch
from litpipe.progress import progress

from litpipe.config import PipelineConfig, TrainConfig
from litpipe.devices import autocast, resolve_device, resolve_precision
from litpipe.errors import UserError
from litpipe.files import TEMP_MARK, write_atomic
from litpipe.models.heads import Heads
from litpipe.models.text_tower import TextTower, build_text_tower
from litpipe.models.tokenizer import Tokenizer, load_tokenizer
from litpipe.prefetch import prefetched
from litpipe.store import Batch, EmbeddingCache, StreamingReader, load_all, resolve_cache
from litpipe.store.caption_rows import CaptionRows, pick_captions
from litpipe.store.text_features import TextFeatureCache
from litpipe.store.tokens import TokenCache
from litpipe.store.views import CacheView
from litpipe.train_text.eval_while_training import EvalWhileTraining
from litpipe.train_text.gather import barrier, sum_gradients, world
from litpipe.train_text.grad_cache import full_backward, grad_cached_backward
from litpipe.train_text.loss import global_contrastive_loss
from litpipe.train_text.metrics_log import MetricsLog
from litpipe.train_text.results import TrainSummary
from litpipe.train_text.text_feature_job import ensure_text_features
from litpipe.train_text.token_cache import ensure_token_cache
from litpipe.train_text.views import build_view

LATEST = "latest.json"
WANDB_RUN = "wandb-run.json"  # the W&B run's id, beside the checkpoints it continues from


@dataclass
class Run:
    """What a training run is made of, built the same way for training, resuming and tests."""

    cache: EmbeddingCache
    tokenizer: Tokenizer | None  # none in head-only training: the text model's features are cached
    tower: TextTower | Heads
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    steps_per_epoch: int
    total_steps: int
    device: torch.device
    swapped_captions: dict[str, list[str]] | None = None  # the shuffled-caption control's pairing
    view: CacheView | None = None  # rows of the cache left out (train.view)
    # Each caption's model input read with the vectors: token ids (train.pretokenize) or, head-only, text features.
    per_caption: CaptionRows | None = None
    # A batch's image side, where it is not the cached vectors: tests and bench/train.py put the locked image
    # tower run on the fly here, the reference the cache is compared against (`images`).
    image_features: Callable[[Batch], torch.Tensor] | None = None
    # Captions -> model input, where no per-caption cache serves them: the tokenizer's ids as int32, as the token
    # cache holds them (half of int64's memory at a large batch; tests put the frozen text model run on the fly
    # here, the reference of the text-feature cache).
    encode_captions: Callable[[list[str]], torch.Tensor] | None = None

    def images(self, batch: Batch) -> torch.Tensor:
        """The batch's image side: its cached vectors (or the on-the-fly reference, `image_features`)."""
        return self.image_features(batch) if self.image_features else batch.embeddings

    def text_side(self) -> tuple[torch.nn.Module, Callable]:
        """(tower, tokenizer) as eval calls them: the tower, or head-only the frozen text model + the heads."""
        return self.tower.for_eval(self.device)


def swap_captions(cache: EmbeddingCache, seed: int) -> dict[str, list[str]]:
    """Every key paired with another image's captions by one fixed permutation: a control run whose
    eval must stay at chance, since nothing of the true image-text pairing reaches training."""
    contents = load_all(cache)
    captioned = [i for i, captions in enumerate(contents.captions) if captions]  # the rows training reads
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(captioned))
    return {contents.keys[i]: contents.captions[captioned[j]] for i, j in zip(captioned, order)}


def build_run(cfg: PipelineConfig, text_features: str | None = None) -> Run:
    """The run of `cfg`; head-only training reads the text-feature cache `text_features` (an id the driver
    built, see `stage.run`), or builds it here."""
    t = cfg.train
    rank, size = world()
    device = resolve_device("cuda" if t.use_gpu else "cpu", "train.use_gpu")
    cache = resolve_cache(cfg, t.dataset, t.cache)
    view = build_view(cfg, cache)
    steps_per_epoch = len(StreamingReader(cache, t.batch_size // size, rank, size, t.seed, 0, text=False, view=view))
    total_steps = t.steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    tokenizer = per_caption = None
    if t.text_model:
        per_caption = open_text_features(cache, text_features) if text_features else ensure_text_features(cfg, cache)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(t.seed)  # the same initial weights on every rank
            tower = Heads(t.heads, per_caption.width, cache.dim, t.init_temperature, t.init_bias, t.text_model,
                          per_caption.fingerprint).to(device)
    else:
        tokenizer = load_tokenizer(t.tokenizer, t.tower.context_length, t.tower.hf_model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(t.seed)  # the same initial weights on every rank
            tower = build_text_tower(t.tower, cache.dim, tokenizer, t.init_temperature, t.init_bias).to(device)
        tower.tokenizer = tokenizer
        tokenizer.context_length = tower.context_length  # an open_clip `init` brings its own
        check_tokenizer_fits(tokenizer, tower, t.tower)
    decay, no_decay = [], []  # weight decay on matrices only, not on gains, biases or positions; LL: projection only
    for name, p in tower.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "positional_embedding" not in name else no_decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=t.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, t.warmup_steps, total_steps))
    swapped = swap_captions(cache, t.seed) if t.shuffle_captions else None
    if t.pretokenize and not swapped and tokenizer is not None:  # the control re-pairs captions by key: it tokenises as it goes
        if rank == 0:
            ensure_token_cache(cache, tokenizer)
        barrier()
        per_caption = TokenCache(cache, tokenizer.fingerprint())
    return Run(cache, tokenizer, tower, optimizer, scheduler, steps_per_epoch, total_steps, device, swapped, view, per_caption,
               encode_captions=(lambda captions: tokenizer(captions).to(torch.int32)) if tokenizer else None)


def open_text_features(cache: EmbeddingCache, features_id: str) -> TextFeatureCache:
    """The complete text-feature cache `features_id` of `cache`, as the driver built it."""
    features = TextFeatureCache.find(cache, features_id)
    if features is None or not features.complete:
        raise UserError(f"{cache.url}/text_features/{features_id}: not a complete text-feature cache; run "
                        "`litpipe train` again, which builds it")
    return features


def check_tokenizer_fits(tokenizer: Tokenizer, tower: TextTower, tower_cfg) -> None:
    """Every id the tokenizer gives has an embedding row, and an HF tower masks exactly its padding."""
    if tokenizer.vocab_size > tower.vocab_size:
        fix = ("a tokenizer of that model" if tower_cfg.hf_model else f"train.tower.vocab_size: {tokenizer.vocab_size}")
        raise UserError(f"train.tokenizer has {tokenizer.vocab_size} ids but the tower embeds {tower.vocab_size}; "
                        f"use {fix}")
    if tower.hf_config is not None and tower.hf_config.pad_token_id != tokenizer.pad_id:
        raise UserError(f"train.tokenizer pads with id {tokenizer.pad_id} but {tower_cfg.hf_model} masks id "
                        f"{tower.hf_config.pad_token_id}; use that model's own tokenizer (train.tokenizer: auto)")


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1, then cosine to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def train(cfg: PipelineConfig, resume: bool = False, text_features: str | None = None,
          on_checkpoint: Callable[[int, str | None], None] | None = None,
          on_eval: Callable[[int, dict[str, float]], None] | None = None) -> TrainSummary:
    """Train (or continue) the text tower of `cfg`; rank 0 writes metrics, checkpoints and the final artifact."""
    return fit(cfg, build_run(cfg, text_features), resume, on_checkpoint, on_eval)


def fit(cfg: PipelineConfig, run: Run, resume: bool = False,
        on_checkpoint: Callable[[int, str | None], None] | None = None,
        on_eval: Callable[[int, dict[str, float]], None] | None = None) -> TrainSummary:
    """The training loop over a built `run`, and its bookkeeping: data wait, logging, evaluation (its metrics
    passed to `on_eval(step, metrics)` on rank 0: a sweep's trial reports them), checkpoints (each then passed
    to `on_checkpoint(step, url)` on every rank, url None but on rank 0), the final tower and the summary;
    see `train`."""
    t = cfg.train
    rank, size = world()
    out = cfg.train_dir
    ckpt_dir = (t.checkpoint_dir or f"{out}/checkpoints").rstrip("/")
    step = load_checkpoint(ckpt_dir, run) if resume else 0
    checkpointed = step if resume else None  # the step of the run's last checkpoint, for a NonFiniteStep's message
    embed = embedder(run, t)
    log = MetricsLog(out, enabled=rank == 0, resumed_at=step if resume else None, wandb=t.wandb, config=cfg.model_dump(),
                     wandb_id=f"{ckpt_dir}/{WANDB_RUN}")
    evaluate = EvalWhileTraining(cfg, log) if t.eval_every and rank == 0 else None
    bar = progress(total=run.total_steps, initial=step, disable=rank != 0, desc="train", unit="step")
    started, losses, skipped = time.perf_counter(), [], 0
    last = started  # a step's time runs from the previous step's end, so waiting for data counts
    run.tower.train()
    for inputs, owner, batch in prefetched(text_batches(run, cfg, step), 2, "litpipe-tokenize"):
        waited = time.perf_counter() - last
        lr = run.scheduler.get_last_lr()[0]
        loss_value, grad_norm = train_step(run, t, embed, inputs, run.images(batch), owner)
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):  # the same on every rank: both are global
            skipped += 1
            if skipped > t.nonfinite_skips:
                raise NonFiniteStep(step + 1, loss_value, grad_norm, ckpt_dir, checkpointed)
        step += 1
        losses.append(loss_value)
        seconds = time.perf_counter() - last
        bar.set_postfix(loss=f"{losses[-1]:.4f}", samples_s=f"{t.batch_size / seconds:,.0f}", data_wait=f"{waited / seconds:.0%}")
        bar.update(1)
        if step % t.log_every == 0 or step == run.total_steps:
            log.write({"step": step, "loss": losses[-1], "lr": lr, "grad_norm": grad_norm, "skipped": skipped,
                       "temperature": run.tower.logit_scale.exp().item(), "bias": run.tower.logit_bias.item(),
                       "samples_per_s": t.batch_size / seconds, "data_wait": waited / seconds})
        if t.eval_every and (step % t.eval_every == 0 or step == run.total_steps):
            if evaluate:
                metrics = evaluate(run, step)
                if on_eval:
                    on_eval(step, metrics)
            barrier()  # the other ranks wait for rank 0's evaluation, no longer
        if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == run.total_steps:
            saved = save_checkpoint(ckpt_dir, run, step, t.keep_checkpoints) if rank == 0 else None
            checkpointed = step
            if on_checkpoint:
                on_checkpoint(step, saved)
        last = time.perf_counter()  # an evaluation or a checkpoint write is neither the step nor waiting for data
    bar.close()
    return finish(cfg, run, log, losses, time.perf_counter() - started)


def finish(cfg: PipelineConfig, run: Run, log: MetricsLog, losses: list[float], elapsed: float) -> TrainSummary:
    """The run's summary; on rank 0 also the final tower, the closed log with its plots and summary.json."""
    t = cfg.train
    rank, size = world()
    summary = TrainSummary(steps=run.total_steps, resumed_at=run.total_steps - len(losses), cache_id=run.cache.id,
                           final_loss=losses[-1] if losses else None,
                           samples_per_s=t.batch_size * len(losses) / max(elapsed, 1e-9),
                           artifact=cfg.final_text_tower, world_size=size, uncaptioned=run.cache.uncaptioned,
                           view=run.view.fingerprint if run.view else None)
    if rank == 0:
        run.tower.save(cfg.final_text_tower, {"cache_id": run.cache.id, "steps": run.total_steps, "loss": t.loss,
                                        "dataset": t.dataset, "lit": "LL (heads)" if t.text_model else t.tower.setting,
                                        "encoder": cfg.encoder.spec(), "view": summary.view})
        log.close()
        curves = log.plot()
        summary.loss_curve, summary.eval_curve = curves["loss_curve"], curves.get("eval_curve")
        if t.keep_best:
            summary.best = f"{cfg.train_dir}/best"
        summary.write(f"{cfg.train_dir}/summary.json")
    return summary


def embedder(run: Run, t: TrainConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """The tower's forward as a step calls it: compiled when train.compile, under the run's precision, float32 out."""
    precision = resolve_precision(t.precision, run.device)
    module = torch.compile(run.tower) if t.compile else run.tower

    def embed(inputs: torch.Tensor) -> torch.Tensor:
        with autocast(precision, run.device):
            return module(inputs.to(run.device, non_blocking=True)).float()

    return embed


def train_step(run: Run, t: TrainConfig, embed: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor,
               images: torch.Tensor, owner: torch.Tensor | None) -> tuple[float, float]:
    """One optimisation step on this rank's slice of the global batch: the global loss and its gradient
    (GradCache, chunk by chunk, or one backward), gradients summed over ranks, clipping, then AdamW and the
    schedule. A NaN/inf loss or gradient norm is not applied (the schedule still moves on). (loss, gradient
    norm before clipping), identical on every rank. `inputs` stay where they are and reach the device a
    chunk at a time, in `embed`."""
    images = images.to(run.device, non_blocking=True)
    owner = owner.to(run.device) if owner is not None else None
    run.optimizer.zero_grad(set_to_none=True)

    def loss_fn(features):
        image_side = run.tower.project_images(images)
        return global_contrastive_loss(features, image_side, run.tower.logit_scale, run.tower.logit_bias, t.loss,
                                       t.chunk_size, owner)

    if t.grad_cache:
        loss = grad_cached_backward(embed, inputs, t.chunk_size, loss_fn)
    else:
        loss = full_backward(embed, inputs, loss_fn)
    sum_gradients(run.tower.parameters())
    grad_norm = torch.nn.utils.clip_grad_norm_(run.tower.parameters(), t.grad_clip or float("inf"))
    loss_value, grad_norm = torch.stack([loss.detach().float(), grad_norm.float()]).tolist()  # one device sync
    if math.isfinite(loss_value) and math.isfinite(grad_norm):
        run.optimizer.step()
    run.scheduler.step()
    return loss_value, grad_norm


class NonFiniteStep(UserError):
    """A step's loss or gradient norm is NaN or inf: the run stops before the update, its last checkpoint intact."""

    def __init__(self, step: int, loss: float, grad_norm: float, ckpt_dir: str, checkpointed: int | None):
        last = (f"{ckpt_dir}/{LATEST} still names the last good checkpoint (step {checkpointed}). Lower train.lr, use "
                "train.precision: fp32 or look at the batch, then `litpipe train --resume`" if checkpointed is not None
                else "No checkpoint was written before it. Lower train.lr, use train.precision: fp32 or look at the "
                "batch, then run again")
        super().__init__(f"train: step {step} gave loss {loss} and gradient norm {grad_norm}; stopped before applying "
                         f"it. {last}; or let train.nonfinite_skips drop up to that many such steps")


def text_batches(run: Run, cfg: PipelineConfig, step: int):
    """(text inputs, owner, store Batch) of this rank from global step `step` on (the trainer prefetches it):
    token ids or text features, one per image (owner None) or every caption with each one's image (owner)."""
    t = cfg.train
    rank, size = world()
    every = t.positives == "all"
    while step < run.total_steps:
        epoch, within = divmod(step, run.steps_per_epoch)
        text = run.per_caption is None or run.image_features is not None  # keys: for the on-the-fly reference
        for batch in StreamingReader(run.cache, t.batch_size // size, rank, size, t.seed, epoch, start_step=within,
                                     shuffle_row_groups=t.shuffle_row_groups, prefetch=t.prefetch_batches, text=text,
                                     per_caption=run.per_caption, all_captions=every, view=run.view):
            if run.per_caption is not None and batch.per_caption is not None:
                yield batch.per_caption, batch.owner, batch
            else:
                captions = [run.swapped_captions[k] for k in batch.keys] if run.swapped_captions else batch.captions
                captions = [c if c else [""] for c in captions]  # a row without captions trains on the empty text
                if every:
                    owner = torch.repeat_interleave(torch.arange(len(captions)), torch.tensor([len(c) for c in captions]))
                    yield run.encode_captions([c for row in captions for c in row]), owner, batch
                else:
                    picks = pick_captions([len(c) for c in captions], t.seed, step, rank)  # the cached rows' rule
                    yield run.encode_captions([c[j] for c, j in zip(captions, picks)]), None, batch
            step += 1
            if step >= run.total_steps:
                return


def save_checkpoint(ckpt_dir: str, run: Run, step: int, keep: int = 2) -> str:
    """step-XXXXXXXX.pt, then latest.json pointing at it (a reader never sees a half-written one);
    then only the newest `keep` step files stay, so a long run does not fill the disk, and no
    temporary file an earlier, killed write left."""
    state = {"step": step, "model": run.tower.state_dict(), "optimizer": run.optimizer.state_dict(),
             "scheduler": run.scheduler.state_dict(), "rng": rng_states()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    fs, root = fsspec.core.url_to_fs(ckpt_dir)
    fs.makedirs(root, exist_ok=True)
    name = f"step-{step:08d}.pt"
    try:
        with fs.open(f"{root}/{name}", "wb") as f:
            f.write(buffer.getvalue())
        write_atomic(fs, f"{root}/{LATEST}", json.dumps({"step": step, "file": name}).encode())  # never left empty
    except Exception as err:  # the store's own retries are spent
        raise UserError(f"train.checkpoint_dir: {ckpt_dir}/{name}: the checkpoint could not be written "
                        f"({type(err).__name__}: {err}); nothing is lost: {_saved(fs, root)}; continue with "
                        "`litpipe train --resume` once the store answers") from err
    for old in sorted(fs.glob(f"{root}/step-*.pt"))[:-keep] + fs.glob(f"{root}/*{TEMP_MARK}*"):
        fs.rm_file(old)
    return f"{ckpt_dir}/{name}"


def _saved(fs, root: str) -> str:
    """What a failed checkpoint write leaves to resume from, in words."""
    try:
        return f"the checkpoint of step {json.loads(fs.cat_file(f'{root}/{LATEST}'))['step']} stands"
    except Exception:
        return "there is no earlier checkpoint"


def load_checkpoint(ckpt_dir: str, run: Run) -> int:
    """Restore the latest checkpoint into `run`; the global step to continue from."""
    fs, root = fsspec.core.url_to_fs(ckpt_dir)
    try:
        with fs.open(f"{root}/{LATEST}", "r") as f:
            latest = json.load(f)
    except FileNotFoundError:
        raise UserError(f"--resume: no checkpoint under {ckpt_dir} ({LATEST} missing); "
                        "run without --resume, or set train.checkpoint_dir to where the run wrote them") from None
    try:
        with fs.open(f"{root}/{latest['file']}", "rb") as f:
            # on the CPU: RNG states must stay CPU tensors; weights and optimiser state move to the device on load
            state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"--resume: {ckpt_dir}/{LATEST} names {latest['file']}, which is missing; restore it, "
                        "or delete the checkpoints and run without --resume") from None
    except pickle.UnpicklingError:  # tensors only are loaded: an older litpipe pickled numpy's RNG state
        raise UserError(f"--resume: {ckpt_dir}/{latest['file']} holds more than tensors (a checkpoint of a litpipe "
                        "before 2026-12, which stored random states as Python objects); resume it with the litpipe "
                        "that wrote it, or run without --resume") from None
    run.tower.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    set_rng_states(state["rng"])
    return int(state["step"])


def rng_states() -> dict[str, torch.Tensor]:
    """Every random generator's state as tensors, so a checkpoint loads with `torch.load(weights_only=True)`
    (numpy's and Python's own states are tuples of arrays and ints, which only a full unpickle restores)."""
    _, keys, position, has_gauss, gauss = np.random.get_state()
    version, words, python_gauss = random.getstate()
    states = {"torch": torch.get_rng_state(),
              "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
              "numpy_rest": torch.tensor([position, has_gauss], dtype=torch.int64),
              "numpy_gauss": torch.tensor(gauss, dtype=torch.float64),
              "python_words": torch.tensor(words, dtype=torch.int64),
              "python_rest": torch.tensor([version, python_gauss is not None], dtype=torch.int64),
              "python_gauss": torch.tensor(python_gauss or 0.0, dtype=torch.float64)}
    if torch.cuda.is_available():
        states["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return states


def set_rng_states(states: dict[str, torch.Tensor]) -> None:
    """Restore what `rng_states` took."""
    torch.set_rng_state(states["torch"])
    position, has_gauss = states["numpy_rest"].tolist()
    np.random.set_state(("MT19937", states["numpy_keys"].numpy().astype(np.uint32), position, has_gauss,
                         float(states["numpy_gauss"])))
    version, has_python_gauss = states["python_rest"].tolist()
    random.setstate((version, tuple(states["python_words"].tolist()),
                     float(states["python_gauss"]) if has_python_gauss else None))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(states["cuda"]))

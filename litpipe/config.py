"""The pipeline.yaml schema: one validated document that says what every stage does.

Validation happens on load, before any work starts, and every error names the dotted key and
the fix (`train.batch_sise: unknown key; did you mean train.batch_size?`).
"""

from __future__ import annotations

import argparse
import difflib
import os
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import fsspec
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from litpipe.errors import UserError
from litpipe.files import content_digest
from litpipe.images import DEFAULT_MAX_PIXELS
from litpipe.scoring.names import metric_names

DEFAULT_CONFIG = "pipeline.yaml"


class ConfigError(UserError):
    """A pipeline.yaml problem, already phrased for the user."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class DatasetConfig(Section):
    """One image-text dataset; every dataset under `data` is precomputed into the store."""

    format: Literal["webdataset", "parquet", "folder", "clip_benchmark"] = Field(
        description="clip_benchmark = an eval set as LAION's CLIP_benchmark ships it: webdataset tars of an image and a "
        ".cls label (classification) or .txt captions one per line (retrieval), classnames.txt and "
        "zeroshot_classification_templates.txt beside the split folder")
    urls: str | list[str] = Field(
        description="fsspec URL(s), globs or brace ranges (shard-{000000..000009}.tar); "
        "for `folder`, the folder of images; for `clip_benchmark`, the split folder (.../wds_imagenet1k/test)"
    )
    captions_file: str | None = Field(
        None, description="folder only: JSONL or CSV with path, caption(s), optional label"
    )
    image_column: str | None = Field(None, description="parquet: image bytes column; webdataset: extension")
    caption_column: str | None = Field(None, description="caption column (or webdataset extension)")
    caption_split: Literal["none", "lines"] = Field(
        "none", description="none = a caption string (a .txt, a Parquet string) is one caption, as img2dataset and "
        "open_clip read it; lines = one caption per line. A list column is several captions either way")
    key_column: str | None = Field(None, description="unique key column; default: derived")
    label_column: str | None = Field(None, description="optional integer class label column (webdataset: its "
                                     "extension; default cls); a sample without one is left out of zero-shot eval")
    classnames: str | list[str] | None = Field(
        None, description="class names (or a file, one per line) indexed by label, for zero-shot eval"
    )
    shard_rows: int = Field(10000, ge=1, description="folder only: captions-file rows per output shard (unit of commit)")

    @model_validator(mode="after")
    def _clip_benchmark_layout(self) -> DatasetConfig:
        """A CLIP_benchmark set names its own class names and caption layout (its webdataset_builder.py)."""
        if self.format == "clip_benchmark":
            if not isinstance(self.urls, str) or any(c in self.urls for c in "*?[{"):
                raise ValueError(f"urls: a clip_benchmark dataset is one split folder (.../wds_imagenet1k/test), with "
                                 f"classnames.txt beside it; got {self.urls!r}")
            self.caption_split = "lines"
            self.classnames = self.classnames or f"{self.benchmark_root}/classnames.txt"
        return self

    @property
    def benchmark_root(self) -> str:
        """A clip_benchmark set's folder, above its split: where its class names, templates and type are."""
        return str(self.urls).rstrip("/").rsplit("/", 1)[0]


class EncoderConfig(Section):
    """The locked image tower whose outputs are cached: an open_clip, timm or Hugging Face model."""

    source: Literal["open_clip", "timm", "hf"] = Field(
        "open_clip", description="which library builds encoder.model: open_clip (a CLIP's image tower), timm (any "
        "timm model, e.g. LiT's vit_base_patch16_224.augreg_in21k) or hf (a transformers vision model: DINOv2, "
        "SigLIP, CLIP vision; encoder.model is its hub id or folder)")
    model: str = "ViT-B-32"
    pretrained: str | None = Field(
        None, description="open_clip: a pretrained tag, a local checkpoint path or an hf-hub: id; timm: `timm` (timm's "
        "own weights for the tag in encoder.model) or a local checkpoint; hf: unused (the weights are encoder.model's); "
        "none = random init"
    )
    architecture: dict[str, Any] | None = Field(
        None, description="an open_clip model config (embed_dim, vision_cfg, text_cfg) registered under "
        "`model`, for architectures open_clip does not ship"
    )
    preprocess: Literal["tensor", "pil"] = Field(
        "tensor", description="tensor = decode workers send uint8 images, the encoder resizes, crops and normalises "
        "them on its device; pil = open_clip's own PIL resize and crop on the CPU (exact parity), normalised on the device")
    jpeg_decode: Literal["auto", "cpu", "device"] = Field(
        "auto", description="device = JPEGs travel encoded and the encoder decodes them in batches (nvjpeg on a GPU; "
        "what it cannot decode falls back to the CPU); auto = device when the encoder runs on a GPU with preprocess: tensor")
    jpeg_draft: bool = Field(
        False, description="decode JPEGs at 1/2, 1/4 or 1/8 scale inside libjpeg (in its DCT) where the smaller image "
        "still covers what the resize keeps (the resize target on pil, twice the input size on tensor): several times "
        "less CPU per large photo, pixels a little different from a full decode (docs/benchmarks.md); in the fingerprint. "
        "JPEGs decoded on the device (jpeg_decode) are decoded whole")
    output: Literal["projected", "pooled", "cls_patch_mean"] | None = Field(
        None, description="none = projected for open_clip, pooled otherwise. "
        "projected = the model's projected embedding (a CLIP's; timm models have none); "
        "pooled = the features before any projection (timm: pre-logits, as LiT caches; hf: the pooler output); "
        "cls_patch_mean = the CLS token concatenated with the mean of the patch tokens, registers excluded (ViTs)")
    normalize: bool = Field(False, description="store L2-normalised vectors; training and eval normalise either way")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto = bf16 on GPU, fp32 on CPU")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = a GPU when the encoder actor has one")
    seed: int = Field(0, description="seeds random init when no pretrained weights are given")
    image_size: int | None = Field(None, ge=8, description="override the model's input size; none = the model's own")
    image_mean: list[float] | None = Field(None, description="override the normalisation mean; none = the model's own")
    image_std: list[float] | None = Field(None, description="override the normalisation std; none = the model's own")
    image_interpolation: Literal["bicubic", "bilinear", "random"] | None = Field(
        None, description="override the resize interpolation; none = the model's own")
    image_resize_mode: Literal["shortest", "longest", "squash"] | None = Field(
        None, description="override how images are fitted to the input size; none = the model's own")

    def spec(self) -> dict:
        """What names this encoder in a cache's identity: every setting but the device, with a local
        checkpoint or model folder named by its bytes (`files.content_digest`), never by the path that
        spells it, so the same weights named from another folder find the same caches."""
        spec = self.model_dump(exclude={"device"})
        if not spec["jpeg_draft"]:  # off, it is what caches made before the setting existed did: their ids stay
            del spec["jpeg_draft"]
        for key in ("pretrained", "model"):
            if spec[key] and os.path.exists(os.path.expanduser(spec[key])):
                spec[key] = content_digest(os.path.expanduser(spec[key]))
        return spec

    @model_validator(mode="after")
    def _options_of_the_source(self) -> EncoderConfig:
        if self.output is None:
            self.output = "projected" if self.source == "open_clip" else "pooled"
        if self.source != "open_clip":
            given = [k for k in ("architecture", "image_size", "image_mean", "image_std", "image_interpolation",
                                 "image_resize_mode") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: open_clip options; a {self.source} model brings its own "
                                 "architecture and preprocessing; remove them")
        if self.source == "hf" and self.pretrained is not None:
            raise ValueError("pretrained: a Hugging Face model's weights are encoder.model's (a hub id or folder); "
                             "set encoder.pretrained: null")
        return self

    @model_validator(mode="after")
    def _device_jpeg_needs_tensor_preprocessing(self) -> EncoderConfig:
        if self.jpeg_decode == "device" and self.preprocess == "pil":
            raise ValueError("jpeg_decode: device decodes on the encoder's device, where the `pil` path's PIL steps "
                             "cannot run; set encoder.preprocess: tensor or encoder.jpeg_decode: cpu")
        return self


class StoreConfig(Section):
    root: str = Field("litpipe-store", description="fsspec URL of the folder that holds every cache")
    embedding_dtype: Literal["float16", "float32"] = Field("float16", description="how vectors are stored")
    row_group_rows: int = Field(65536, ge=1, description="Parquet row-group size of new caches (the reader's unit)")


class PrecomputeConfig(Section):
    batch_size: int = Field(256, ge=1, description="images per encoder forward")
    decode_workers: int | None = Field(None, ge=1, description="CPU decode tasks; none = one per free CPU")
    encoder_actors: int = Field(1, ge=1, description="encoder actors (one GPU each when GPUs exist)")
    max_image_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="larger images are skipped as bombs")
    rows_per_commit: int = Field(4096, ge=1, description="samples per committed part of an input shard: the unit of "
                                 "resume (fixed when a cache is created)")
    part_bytes: int = Field(256 * 2**20, ge=2**20, description="a part also ends before its images' bytes, encoded "
                            "plus decoded, pass this: a read task holds two to three times this, "
                            "whatever the images' sizes and rows_per_commit, plus Ray Data's output buffer of "
                            "parts already yielded (up to 128 MiB) (fixed when a cache is created)")
    read_retries: int = Field(3, ge=0, description="times a read task reads its shard again after a read failure, "
                              "pausing 1, 2, 4, ... s (on top of the store client's own retries); a shard that still "
                              "fails is reported, never skipped. Lost workers and nodes are retried by Ray")
    encoder_threads: int | None = Field(None, ge=1, description="torch threads in a CPU encoder actor; none = the node's CPUs")


class TextTowerConfig(Section):
    """The text tower: open_clip's CLIP-style transformer (random, or an open_clip model's text tower), or a
    Hugging Face language model through open_clip's HF text encoder; LiT's setting in its own notation."""

    hf_model: str | None = Field(
        None, description="a Hugging Face language model as the text tower, by hub id or local folder (BERT, RoBERTa, "
        "XLM-R, mT5, sentence-transformers BERT models): its own tokenizer, width and depth; none = the CLIP-style tower")
    hf_pooler: Literal["mean_pooler", "max_pooler", "cls_pooler", "cls_last_hidden_state_pooler"] | None = Field(
        None, description="hf_model only: open_clip's pooler; none = open_clip's default for the architecture")
    hf_proj: Literal["linear", "mlp"] = Field("linear", description="hf_model only: the projection to the image dim")
    lit: Literal["Lu", "LU", "LL"] | None = Field(
        None, description="LiT's text-tower setting: Lu = random init (of hf_model's or init's architecture), "
        "LU = pretrained weights, trained, LL = pretrained and locked: only the projection and temperature train; "
        "none = LU when hf_model or init is given, else Lu")
    width: int = Field(512, ge=8, description="CLIP-style tower: transformer width")
    layers: int = Field(12, ge=1, description="CLIP-style tower: transformer layers")
    heads: int = Field(8, ge=1, description="CLIP-style tower: attention heads; must divide width")
    context_length: int = Field(77, ge=2, description="tokens per caption, special tokens included")
    vocab_size: int = Field(49408, ge=2, description="CLIP-style tower: token embedding rows; at least the tokenizer's")
    init: str = Field(
        "random", description="CLIP-style tower: `random`, or an open_clip model (name[@pretrained], local-dir:DIR, "
        "hf-hub:org/name) whose text tower it starts from"
    )

    @model_validator(mode="after")
    def _one_source_and_a_setting_it_allows(self) -> TextTowerConfig:
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        if self.hf_model and self.init != "random":
            raise ValueError(f"hf_model ({self.hf_model}) and init ({self.init}) both name a tower; keep one")
        if self.lit in ("LU", "LL") and not self.hf_model and self.init == "random":
            raise ValueError(f"lit: {self.lit} starts from pretrained weights; set train.tower.hf_model or "
                             "train.tower.init, or lit: Lu")
        return self

    @property
    def setting(self) -> str:
        """`lit` with its default applied: LU when a pretrained tower is named, else Lu."""
        return self.lit or ("LU" if self.hf_model or self.init != "random" else "Lu")


class TextModelConfig(Section):
    """A frozen Hugging Face text model whose features are cached once per caption (both sides cached:
    only heads train, as ShareLock and SAIL train on a frozen language model's features)."""

    model: str = Field(description="a Hugging Face text model by hub id or local folder: an encoder (BERT, XLM-R, a T5 "
                       "encoder, a sentence-embedding model) or a decoder language model")
    pooling: Literal["cls", "mean", "last", "eos"] = Field(
        "mean", description="cls = the first token; mean = over the caption's tokens; last = the last token (causal "
        "models); eos = the first end token (BERT's [SEP], T5's </s>)")
    max_length: int = Field(77, ge=2, description="tokens per caption, special tokens included; longer ones are cut")
    dtype: Literal["float16", "float32"] = Field("float16", description="how the cached features are stored")
    batch_size: int = Field(256, ge=1, description="captions per forward while caching")
    actors: int = Field(1, ge=1, description="text-model actors while caching (one GPU each when GPUs exist)")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 autocast on GPU, fp32 on CPU")


class HeadConfig(Section):
    kind: Literal["none", "linear", "mlp"] = Field("none", description="none = the features as they are")
    depth: int = Field(2, ge=1, description="mlp: linear layers (GELU between them)")
    width: int = Field(1024, ge=1, description="mlp: hidden width")
    bias: bool = Field(True, description="false: bias-free layers, as CLIP's projections (an open_clip export of the "
                       "text head needs them: linear, or mlp of depth 2)")


class TextHeadConfig(HeadConfig):
    kind: Literal["none", "linear", "mlp"] = Field("mlp", description="none = the features as they are")
    depth: int = Field(4, ge=1, description="mlp: linear layers (GELU between them)")


class HeadsConfig(Section):
    """The trainable heads of head-only training (ShareLock: no image head, a 4-layer text MLP)."""

    text: TextHeadConfig = TextHeadConfig()
    image: HeadConfig = HeadConfig()
    dim: int | None = Field(None, ge=1, description="the shared space's dim; none = the image features' (needed "
                            "when the image head is none)")


class WandbConfig(Section):
    project: str = Field(description="the W&B project")
    name: str | None = Field(None, description="the run's name; none = W&B's")
    mode: Literal["online", "offline", "disabled"] = Field("online", description="offline = write locally, `wandb sync` later")


class ViewConfig(Section):
    """Rows of the training cache left out when it is read (store/views.py): the cache is never rewritten."""

    name: str = Field("view", description="what the run and a sweep's table call it")
    exclude_keys: str | list[str] | None = Field(None, description="keys to leave out: a list, or a file of one key "
                                                 "per line (any fsspec URL)")
    include_keys: str | list[str] | None = Field(None, description="train on these keys only (a list or a file)")
    near_duplicates_of: list[str] = Field(default_factory=list, description="`data` entries (eval sets) whose images "
                                          "the left-out rows near-duplicate, on the cached vectors (LiT's section 2.6)")
    threshold: float = Field(0.95, gt=-1, le=1, description="cosine at or above which two images are near-duplicates")


class TrainConfig(Section):
    dataset: str = Field("train", description="the `data` entry to train on")
    cache: str | None = Field(None, description="a cache id or URL; none = the cache of `dataset`")
    tokenizer: str = Field("auto", description="auto = the tokenizer of train.tower.hf_model, else CLIP's; `clip`, a "
                           "tokenizer.json URL, or a Hugging Face model (hub id or folder) whose tokenizer to use")
    pretokenize: bool = Field(True, description="read caption token ids from a token cache beside the embedding cache, "
                              "built once per tokenizer; false = tokenise every step (while changing the tokenizer)")
    tower: TextTowerConfig = TextTowerConfig()
    loss: Literal["softmax", "sigmoid"] = "softmax"
    batch_size: int = Field(1024, ge=2, description="the global batch, over all workers")
    chunk_size: int = Field(256, ge=1, description="rows per loss/gradient-cache chunk")
    grad_cache: bool = Field(True, description="GradCache: activation memory set by chunk_size, not batch_size")
    shuffle_captions: bool = Field(
        False, description="control run: each image trains with another image's captions (a fixed permutation); "
        "its eval must stay at chance"
    )
    steps: int | None = Field(None, ge=1, description="optimiser steps; none = `epochs` worth")
    epochs: float = Field(1.0, gt=0, description="passes over the cache when `steps` is none")
    lr: float = Field(1e-3, gt=0, description="peak AdamW learning rate (linear warmup, then cosine to 0)")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay on matrices only")
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0, description="global gradient-norm clip; none = no clipping")
    nonfinite_skips: int = Field(0, ge=0, description="steps whose loss or gradient norm is NaN/inf that are dropped "
                                 "(no update) before the run stops at the next one; 0 = stop at the first")
    init_temperature: float = Field(10.0, gt=0, description="LiT starts the logit scale at 10")
    init_bias: float = Field(-10.0, description="sigmoid loss only")
    seed: int = Field(0, description="seeds the tower's init, the shuffle and the caption picks")
    shuffle_row_groups: int = Field(16, ge=1, description="cache row groups (each from one input shard) whose rows are "
                                    "shuffled together: a batch mixes this many shards; reader memory ~ 2 x this x "
                                    "row-group rows (<= precompute.rows_per_commit) x (dim x 2 bytes + text)")
    prefetch_batches: int = Field(8, ge=1, description="batches the cache reader reads ahead in a background thread")
    workers: int = Field(1, ge=1, description="1 = single process; more = Ray Train workers")
    use_gpu: bool = Field(False, description="train on the GPU (each Ray Train worker gets one)")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 autocast on GPU, fp32 on CPU")
    compile: bool = Field(False, description="torch.compile the text tower")
    checkpoint_every: int = Field(0, ge=0, description="steps between checkpoints; 0 = only at the end")
    checkpoint_dir: str | None = Field(None, description="fsspec URL for resumable checkpoints; none = {workdir}/train/checkpoints")
    keep_checkpoints: int = Field(2, ge=1, description="newest step checkpoints kept; older ones are deleted")
    max_failures: int = Field(3, ge=-1, description="train.workers > 1: times Ray Train restarts a worker group that "
                              "lost a worker (a preempted node, an OOM kill), each from the last checkpoint, within "
                              "one run; -1 = no limit, 0 = the first loss ends the run")
    log_every: int = Field(10, ge=1, description="steps between metrics.jsonl / TensorBoard records")
    eval_every: int = Field(0, ge=0, description="steps between evaluations on the eval sets (text side only: image "
                            "vectors are cached), and at the end; 0 = none while training")
    keep_best: str | None = Field(None, description="with eval_every: keep the text tower of the best value of this "
                                  "metric at {workdir}/train/best, e.g. zeroshot/heldout/acc1")
    wandb: WandbConfig | None = Field(None, description="also log to Weights & Biases (pip install 'litpipe[wandb]')")
    text_model: TextModelConfig | None = Field(
        None, description="head-only training: this frozen text model's features are cached beside the embedding "
        "cache and only `heads` train (train.tower is not used); none = train a text tower")
    heads: HeadsConfig = HeadsConfig()
    view: ViewConfig | None = Field(None, description="a cache view: rows left out when reading (keys, or near-"
                                    "duplicates of eval sets); none = every row")
    positives: Literal["sampled", "all"] = Field(
        "sampled", description="sampled = one caption per image per step (seeded); all = every caption of the image "
        "is a positive in the step (train_text/loss.py)")

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainConfig:
        if self.batch_size % self.workers:
            raise ValueError(
                f"batch_size must be divisible by the number of workers ({self.workers}); got {self.batch_size}"
            )
        if self.shuffle_captions and self.text_model:
            raise ValueError("shuffle_captions re-pairs captions by key, which cached text features cannot follow; run "
                             "the control with a text tower (text_model: null)")
        if self.heads.image.kind == "none" and self.heads.dim is not None:
            raise ValueError("heads.dim sets the dim of an image head; with heads.image.kind: none the image features' "
                             "dim is the shared one: remove heads.dim or give an image head")
        return self


class ZeroShotConfig(Section):
    dataset: str
    templates: str | list[str] | None = Field(
        None, description="`openai` (open_clip's ImageNet templates), a file (one per line) or a list; `{c}` marks the "
        "class name; none = a clip_benchmark set's own (its zeroshot_classification_templates.txt), else openai"
    )
    ks: list[int] = Field([1, 5], min_length=1, description="top-k accuracies to report")


class EvalConfig(Section):
    retrieval: list[str] = Field(default_factory=list, description="`data` entries for image-text retrieval")
    zeroshot: list[ZeroShotConfig] = Field(default_factory=list)
    ks: list[int] = Field([1, 5, 10], min_length=1, description="recall@k values to report")
    index: Literal["auto", "flat", "ivf"] = Field(
        "auto", description="auto = flat: exact faiss search (on GPU when faiss sees one); ivf for huge galleries"
    )
    ivf_nlist: int | None = Field(None, ge=1, description="ivf lists; none = about 4 sqrt(N)")
    ivf_nprobe: int = Field(16, ge=1, description="ivf lists searched per query")
    text_batch_size: int = Field(512, ge=1, description="texts per text-tower forward")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where text features are computed")
    checkpoint: str | None = Field(None, description="a checkpoint or export; none = the train stage's last")


class RayConfig(Section):
    address: str = Field("", description="empty = a local Ray here; `auto` or ray://host:port = a cluster")
    num_cpus: int | None = Field(None, ge=1, description="local Ray only: CPUs to use; none = all")
    num_gpus: int | None = Field(None, ge=0, description="local Ray only: GPUs to use; none = all")


class PipelineConfig(Section):
    workdir: str = Field("runs/default", description="checkpoints, eval reports and plots go here")
    data: dict[str, DatasetConfig] = Field(min_length=1)
    encoder: EncoderConfig = EncoderConfig()
    store: StoreConfig = StoreConfig()
    precompute: PrecomputeConfig = PrecomputeConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    ray: RayConfig = RayConfig()

    @property
    def train_dir(self) -> str:
        """Where the train stage writes: checkpoints, metrics, the loss curve and the final text tower."""
        return f"{self.workdir.rstrip('/')}/train"

    @property
    def final_text_tower(self) -> str:
        """The text tower a finished training leaves, which eval, export and serve read by default."""
        return f"{self.train_dir}/final"

    @model_validator(mode="after")
    def _templates_of_the_dataset(self) -> PipelineConfig:
        for zeroshot in self.eval.zeroshot:
            dataset = self.data.get(zeroshot.dataset)
            if zeroshot.templates is None:
                zeroshot.templates = (f"{dataset.benchmark_root}/zeroshot_classification_templates.txt"
                                      if dataset is not None and dataset.format == "clip_benchmark" else "openai")
        return self

    @model_validator(mode="after")
    def _datasets_exist(self) -> PipelineConfig:
        # A config written for precompute alone has no train section: its default dataset is checked when training.
        named = [("train.dataset", self.train.dataset)] if "train" in self.model_fields_set else []
        named += [(f"eval.retrieval[{i}]", name) for i, name in enumerate(self.eval.retrieval)]
        named += [(f"eval.zeroshot[{i}].dataset", z.dataset) for i, z in enumerate(self.eval.zeroshot)]
        for key, name in named:
            if name not in self.data:
                raise ValueError(f"{key}: no dataset `{name}` under data; known: {', '.join(self.data)}")
        if self.train.eval_every and not (self.eval.retrieval or self.eval.zeroshot):
            raise ValueError("train.eval_every: there are no eval sets (eval.retrieval, eval.zeroshot); add one, or set 0")
        if self.train.keep_best:
            known = metric_names(self.eval)
            if not self.train.eval_every:
                raise ValueError("train.keep_best: needs train.eval_every > 0, the evaluations it picks from")
            if self.train.keep_best not in known:
                guess = difflib.get_close_matches(self.train.keep_best, known, n=1)
                raise ValueError(f"train.keep_best: no metric `{self.train.keep_best}`; "
                                 + (f"did you mean {guess[0]}? " if guess else "") + f"known: {', '.join(known)}")
        return self


def chosen_checkpoint(cfg: PipelineConfig, requested: str | None = None) -> str:
    """The text tower an eval command uses when the user names none: `requested`, else eval.checkpoint, else
    where the train stage leaves its final text tower."""
    return requested or cfg.eval.checkpoint or cfg.final_text_tower


def training_dataset(cfg: PipelineConfig) -> str:
    """train.dataset, checked against `data` (a config without a train section is checked only when it trains)."""
    if cfg.train.dataset not in cfg.data:
        raise ConfigError(f"train.dataset: no dataset `{cfg.train.dataset}` under data; known: {', '.join(cfg.data)}; "
                          "set train.dataset to the one to train on")
    return cfg.train.dataset


def chosen_dataset(cfg: PipelineConfig, requested: str | None = None) -> str:
    """The dataset a search or serve command shows when the user names none: `requested`, else the first eval
    set, else the training set; a `data` entry either way."""
    eval_sets = [*cfg.eval.retrieval, *(z.dataset for z in cfg.eval.zeroshot)]
    dataset = requested or next(iter(eval_sets), cfg.train.dataset)
    if dataset not in cfg.data:
        raise ConfigError(f"--dataset {dataset}: no such `data` entry; known: {', '.join(cfg.data)}")
    return dataset


def defaults_yaml() -> str:
    """Every key of the schema with its default and description, as commented YAML (`litpipe config --defaults`).

    Generated from the schema itself, so the reference never drifts from what litpipe accepts.
    """
    lines = ["# Every pipeline.yaml key with its default (`litpipe config --defaults`).",
             "# Generated from litpipe's schema; `data` and `eval.zeroshot` show one example entry."]
    _describe_section(PipelineConfig, lines, indent="")
    return "\n".join(lines) + "\n"


def _describe_section(section: type[BaseModel], lines: list[str], indent: str) -> None:
    for name, field in section.model_fields.items():
        note = f"  # {field.description}" if field.description else ""
        inner = _section_type(field.annotation)
        if inner is not None and not field.is_required() and field.default is None:  # an optional section, off
            lines.append(f"{indent}{name}: null{note}; its keys:")
            keys: list[str] = []
            _describe_section(inner, keys, indent="")
            lines += [f"{indent}#   {key}" for key in keys]
            continue
        if inner is not None:
            lines.append(f"{indent}{name}:{note}")
            if get_origin(field.annotation) is dict:
                lines.append(f"{indent}  <name>:  # one entry per dataset")
                _describe_section(inner, lines, indent + "    ")
            elif get_origin(field.annotation) is list:
                lines.append(f"{indent}  - # one entry per zero-shot eval set")
                _describe_section(inner, lines, indent + "    ")
            else:
                _describe_section(inner, lines, indent + "  ")
            continue
        value = "<required>" if field.is_required() else _yaml_value(field.get_default(call_default_factory=True))
        choices = get_args(field.annotation) if get_origin(field.annotation) is Literal else ()
        if choices:
            note = f"  # one of {' | '.join(map(str, choices))}" + (f"; {field.description}" if field.description else "")
        lines.append(f"{indent}{name}: {value}{note}")


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The section class a field holds directly, or as the values of a dict or the items of a list."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The arguments every pipeline command shares: a config path and `--set` overrides."""
    parser.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help="pipeline.yaml to use (default: %(default)s)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.batch_size=4096 (repeatable)",
    )


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    return load_config(args.config, args.overrides)


def load_config(path: str | Path = DEFAULT_CONFIG, overrides: list[str] = (), overrides_from: str | None = None
                ) -> PipelineConfig:
    """Read (a path or any fsspec URL), override (`dotted.key=value`, the value parsed as YAML) and
    validate a pipeline.yaml. Relative paths in overrides start from `overrides_from` (a sweep file's
    folder), else from the working folder, as `--set` does."""
    path = str(path)
    try:
        with fsspec.open(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"{path}: no such config file; pass the path or URL of a pipeline.yaml") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config ({type(err).__name__}: {err}); check the URL and its "
                          "credentials") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (data, encoder, ...)")
    resolve_relative_paths(raw, _folder_of(path))
    for item in overrides:
        resolve_relative_paths(raw, overrides_from or os.getcwd(), within=apply_override(raw, item))
    return validate_config(raw, source=str(path))


def _folder_of(config: str) -> str:
    """The folder a config's relative paths start from: its own, absolute for a local file (a cache's
    identity, a checkpoint's or an export's config must not depend on the working directory)."""
    if "://" in config:
        return config.rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(os.path.expanduser(config)))


# Keys whose value is always a path (made relative to the config file when relative), and keys whose
# value may be a path or a name (a pretrained tag, a hub id, `openai`): a path only where the file is.
PATH_KEYS = [("workdir",), ("store", "root"), ("train", "checkpoint_dir"), ("data", "*", "urls"),
             ("data", "*", "captions_file"), ("train", "view", "exclude_keys"), ("train", "view", "include_keys")]
PATH_OR_NAME_KEYS = [("encoder", "pretrained"), ("encoder", "model"), ("data", "*", "classnames"),
                     ("train", "tower", "hf_model"), ("train", "tower", "init"), ("train", "tokenizer"),
                     ("train", "cache"), ("train", "text_model", "model"), ("eval", "checkpoint"),
                     ("eval", "zeroshot", "*", "templates")]


def resolve_relative_paths(raw: dict, base: str, within: tuple = ()) -> None:
    """Relative paths in a config mean relative to its file, as in docker-compose or a Makefile:
    `litpipe run experiments/a/pipeline.yaml` finds `experiments/a/data/`, from any folder. They are
    made absolute here, once, so nothing downstream depends on the working directory. Overrides given
    with --set are relative to the working folder (`within`: only the keys under the one overridden)."""
    for keys, always in [(k, True) for k in PATH_KEYS] + [(k, False) for k in PATH_OR_NAME_KEYS]:
        for where, node, key in _at(raw, keys):
            if where[:len(within)] != list(within[:len(where)]):
                continue
            value = node[key]
            if isinstance(value, list) and keys[-1] == "urls":
                node[key] = [_relative_to(base, v, always) for v in value]
            elif isinstance(value, str):
                node[key] = _relative_to(base, value, always)


def _at(node, keys: tuple, where: tuple = ()):
    """(path, mapping, key) where `keys` lead in `node`; `*` is every entry of a mapping or list."""
    head, rest = keys[0], keys[1:]
    if head == "*":
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for name, child in children:
            yield from _at(child, rest, (*where, name))
    elif isinstance(node, dict) and head in node:
        yield from _at(node[head], rest, (*where, head)) if rest else [([*where, head], node, head)]


def _relative_to(base: str, value: str, always: bool) -> str:
    """`value` joined to the config's folder when it is a relative local path (and, unless `always`,
    names a file or folder that is there)."""
    if value.startswith("~"):
        return os.path.expanduser(value)
    if not value or "://" in value or value.startswith("/") or ":" in value.split("/")[0]:
        return value  # a URL, an absolute path, or a hf-hub:/local-dir: name
    joined = f"{base}/{value}" if "://" in base else os.path.normpath(os.path.join(base, value))
    if always:
        return joined
    try:
        fs, target = fsspec.core.url_to_fs(joined)
        return joined if fs.exists(target) else value
    except (OSError, ValueError):
        return value


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b.c=value` -> ("a.b.c", value parsed as YAML; empty is null)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. --set train.batch_size=4096")
    return key.strip(), yaml.safe_load(value) if value.strip() else None


def apply_override(raw: dict, item: str) -> tuple:
    """Set `a.b.c=value` in a nested dict, creating mappings on the way; the keys set."""
    key, value = parse_override(item)
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value
    return tuple(parts)


def validate_config(raw: dict, source: str = "pipeline.yaml") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        lines = [_describe(e, raw) for e in err.errors()]
        raise ConfigError(f"{source}: " + ("\n  ".join(["invalid config:", *lines]) if len(lines) > 1 else lines[0])) from None


def _describe(error: dict, raw: dict) -> str:
    loc = _file_loc(error["loc"])
    key = _dotted(loc)
    if error["type"] == "extra_forbidden":
        guess = difflib.get_close_matches(str(loc[-1]), _known_fields(loc[:-1]), n=1)
        hint = f"did you mean {_dotted([*loc[:-1], guess[0]])}?" if guess else f"known keys: {', '.join(_known_fields(loc[:-1]))}"
        return f"{key}: unknown key; {hint}"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        return f"{key}: required; add it to the config"
    got = f"; got {error['input']!r}" if "input" in error and not isinstance(error["input"], dict) else ""
    return f"{key}: {message}{got}" if key else message


def _dotted(loc: list) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _file_loc(loc: tuple) -> list:
    """`loc` as keys of the file: pydantic adds the member tried for a union field (`urls.str`,
    `urls.list[str]`), which is no key; dropped by walking the schema, so a dataset named like one stays."""
    out, node = [], PipelineConfig
    for part in loc:
        if _is_union(node):
            node = None
            continue
        out.append(part)
        node = _child(node, part)
    return out


def _known_fields(loc: list) -> list[str]:
    """The field names of the section at `loc`, for did-you-mean hints."""
    node: Any = PipelineConfig
    for part in loc:
        node = _child(node, part)
    return list(node.model_fields) if isinstance(node, type) and issubclass(node, BaseModel) else []


def _child(node: Any, part: str | int) -> Any:
    """The type at `part` inside `node` (a section, dict, list or optional), or None when unknown."""
    if isinstance(node, type) and issubclass(node, BaseModel):
        field = node.model_fields.get(part)
        return field.annotation if field else None
    origin, args = get_origin(node), [a for a in get_args(node) if a is not type(None)]
    if origin is dict:
        return args[1]
    if origin is list:
        return args[0]
    if origin in (Union, UnionType) and len(args) == 1:  # `X | None` is X
        return _child(args[0], part)
    return None


def _is_union(node: Any) -> bool:
    """A union of several types (not just `X | None`), whose errors pydantic tags with the member tried."""
    return get_origin(node) in (Union, UnionType) and len([a for a in get_args(node) if a is not type(None)]) > 1

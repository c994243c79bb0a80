"""Fixtures shared across test modules; a fixture one module alone uses stays in that module."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from litpipe.store.commits import commit_part, finalize
from litpipe.config import validate_config
from litpipe.models.image_encoder import load_encoder
from litpipe.store import EmbeddingCache
from litpipe.store.fingerprint import dataset_fingerprint

# A small randomly initialised open_clip architecture: real open_clip code, fast on 2 CPU cores.
TINY_ARCHITECTURE = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One real local Ray cluster for the whole test session (starting one costs seconds); started
    after the S3 server, so its workers inherit the server's endpoint and credentials."""
    import ray

    # 3 logical CPUs on the 2-core machine: room for two encoder actors (a CPU each) and a read task.
    ray.init(num_cpus=3, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 protocol server (moto) on loopback for the session.

    Sets AWS credentials, AWS_ENDPOINT_URL and FSSPEC_S3_ENDPOINT_URL in os.environ (so processes
    started afterwards, Ray workers included, inherit them) and fsspec's config for this process,
    so a plain `fsspec.filesystem("s3")` or an `s3://` URL reaches it. Yields {"endpoint_url",
    "bucket", "env", "storage_options"}; most tests want `s3_root` below.
    """
    import os
    import socket

    import fsspec
    import fsspec.config
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint, "FSSPEC_S3_ENDPOINT_URL": endpoint}
    saved_env = {k: os.environ.get(k) for k in env}
    saved_conf = dict(fsspec.config.conf.get("s3", {}))
    os.environ.update(env)
    fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = endpoint
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir("litpipe-test")
    yield {"endpoint_url": endpoint, "bucket": "litpipe-test", "env": env,
           "storage_options": {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}}
    fsspec.config.conf["s3"] = saved_conf
    for key, value in saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture
def s3_root(s3_server):
    """A fresh, empty `s3://litpipe-test/<random>` prefix on the moto server."""
    import uuid

    return f"s3://{s3_server['bucket']}/{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def planted_in_parts(ray_local, tmp_path_factory):
    """The planted dataset (every kind of bad input) and its cache cut into parts of two samples, as
    an uninterrupted run writes it: the reference of the mid-shard resume and the kill tests."""
    from litpipe.precompute import stage
    from precompute_samples import build_planted_dataset, planted_config

    base = tmp_path_factory.mktemp("planted-in-parts")
    build_planted_dataset(base / "data")
    cfg = validate_config(planted_config(base / "data", str(base / "reference" / "store"), precompute={"rows_per_commit": 2}))
    return {"base": base, "cache": EmbeddingCache.open(stage.run(cfg).datasets["train"].cache_url)}


# --- a tiny trained-on cache for the trainer's tests ------------------------------------

ROWS = 96
WORDS = ["red", "blue", "cat", "dog", "face", "smiling", "rocket", "tree", "flag", "heart", "star", "moon"]


def raw_config(tmp: Path, **train) -> dict:
    """The tiny encoder, store and text tower of `tiny_cache`, with `train` overrides."""
    return {
        "workdir": str(tmp / "run"),
        "data": {"train": {"format": "webdataset", "urls": str(tmp / "inputs" / "part-*.tar")}},
        "encoder": {"model": "litpipe-train-test-tiny", "architecture": TINY_ARCHITECTURE, "precision": "fp32"},
        "store": {"root": str(tmp / "store"), "embedding_dtype": "float32"},
        "train": {"tower": {"width": 32, "layers": 1, "heads": 2, "context_length": 16}, "batch_size": 16,
                  "chunk_size": 6, "steps": 4, "lr": 3e-3, "warmup_steps": 2, "log_every": 1, **train},
    }


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """A real cache written through the store API from the tiny encoder's outputs on random images."""
    tmp = tmp_path_factory.mktemp("train")
    (tmp / "inputs").mkdir()
    for i in range(2):
        (tmp / "inputs" / f"part-{i}.tar").write_bytes(b"stand-in input shard %d" % i)
    cfg = validate_config(raw_config(tmp))
    encoder = load_encoder(cfg.encoder, device="cpu")
    images = torch.rand(ROWS, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    rng = np.random.default_rng(0)
    captions = [[" ".join(rng.choice(WORDS, 3)) for _ in range(rng.integers(1, 4))] for _ in range(ROWS)]
    keys = [f"k{i:04d}" for i in range(ROWS)]
    embeddings = encoder.encode(images).numpy()
    cache = EmbeddingCache.open_or_create(cfg.store.root, encoder.fingerprint, dataset_fingerprint(cfg.data["train"]),
                                          embedding_dtype="float32", row_group_rows=24)
    for part, rows in enumerate((slice(0, 48), slice(48, ROWS))):
        table = pa.table({"key": keys[rows], "captions": captions[rows],
                          "embedding": pa.FixedSizeListArray.from_arrays(embeddings[rows].reshape(-1), embeddings.shape[1])})
        commit_part(cache, str(tmp / "inputs" / f"part-{part}.tar"), table)
    finalize(cache)
    return {"tmp": tmp, "images": dict(zip(keys, images)), "encoder": encoder}


def tiny_train_config(tiny_cache, name, **train):
    """A training config over `tiny_cache` whose run writes under its own workdir `name`."""
    raw = raw_config(tiny_cache["tmp"], **train)
    raw["workdir"] = str(tiny_cache["tmp"] / name)
    return raw


# --- tiny frozen text models for head-only training ----------------------------------------

@pytest.fixture(scope="session")
def text_models(tmp_path_factory):
    """A tiny random BERT (WordPiece: [CLS] ... [SEP]), GPT-2-style causal LM (word-level, no end token added) and
    T5 (word-level, </s> added), saved as a user's model folders are."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    root = tmp_path_factory.mktemp("text-models")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "a", "the", "under"]
    bert = root / "bert"
    bert.mkdir()
    (bert / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(bert / "vocab.txt")).save_pretrained(bert)
    torch.manual_seed(11)
    transformers.BertModel(transformers.BertConfig(vocab_size=len(vocab), hidden_size=24, num_hidden_layers=2,
                                                   num_attention_heads=2, intermediate_size=48,
                                                   max_position_embeddings=32)).save_pretrained(bert)
    gpt = root / "gpt"
    words = {w: i for i, w in enumerate(["<unk>", "<eos>", *vocab[5:]])}
    rust = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    rust.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=rust, unk_token="<unk>", eos_token="<eos>").save_pretrained(gpt)
    transformers.GPT2Model(transformers.GPT2Config(vocab_size=len(words), n_embd=24, n_layer=2, n_head=2,
                                                   n_positions=32)).save_pretrained(gpt)
    t5 = root / "t5"  # an encoder-decoder: its encoder's states, </s> after each text
    rust = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    rust.pre_tokenizer = pre_tokenizers.Whitespace()
    rust.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 1)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=rust, unk_token="<unk>", eos_token="<eos>",
                                         pad_token="<unk>").save_pretrained(t5)
    transformers.T5Model(transformers.T5Config(vocab_size=len(words), d_model=24, d_kv=12, d_ff=48, num_layers=2,
                                               num_heads=2, pad_token_id=0, eos_token_id=1,
                                               decoder_start_token_id=0)).save_pretrained(t5)
    return {"bert": str(bert), "gpt": str(gpt), "t5": str(t5)}


def head_config(tiny_cache, name: str, text_models, **train) -> dict:
    """Head-only training over `tiny_cache`: the tiny BERT's mean-pooled features (float32), a 2-layer text MLP and
    a linear image head into 20 dims."""
    text_model = {"model": text_models["bert"], "pooling": "mean", "dtype": "float32", "batch_size": 7}
    heads = {"text": {"kind": "mlp", "depth": 2, "width": 16}, "image": {"kind": "linear"}, "dim": 20}
    return tiny_train_config(tiny_cache, name, **{"text_model": text_model, "heads": heads, "chunk_size": 5, "steps": 5,
                                                  **train})

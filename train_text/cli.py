"""`litpipe train`, `litpipe text-features`, `litpipe export`, `litpipe tokenizer train`."""

from __future__ import annotations

import json

from litpipe.config import add_config_args, config_from_args


def register(commands) -> None:
    features = commands.add_parser(
        "text-features", help="cache train.text_model's feature of every caption of a cache (head-only training)",
        description="Run the frozen text model of train.text_model once over every caption of a dataset's cache (a Ray "
        "Data job; resumable) and keep the features beside it; `litpipe train` builds them too, when missing.")
    add_config_args(features)
    features.add_argument("--dataset", help="the `data` entry whose cache's captions to encode (default: train.dataset)")
    features.set_defaults(func=_text_features)

    train = commands.add_parser("train", help="train the text tower on the train cache (train section)",
                                description="Train a text tower against cached image embeddings; writes {workdir}/train/.")
    add_config_args(train)
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint (train.checkpoint_dir)")
    train.set_defaults(func=_train)

    export = commands.add_parser("export", help="write an open_clip-loadable model: locked image tower + trained text tower",
                                 description="Load it with open_clip.create_model_and_transforms('local-dir:OUT').")
    add_config_args(export)
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument("--checkpoint", help="text-tower folder (default: the train stage's final one, {workdir}/train/final)")
    export.set_defaults(func=_export)

    tokenizer = commands.add_parser("tokenizer", help="fit a BPE or Unigram tokenizer on the captions of a cache",
                                    description="Fit a tokenizer on a cache's captions.")
    actions = tokenizer.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    fit = actions.add_parser("train", help="fit a vocabulary of --vocab-size ids on a cache's captions, write tokenizer.json",
                             description="Fit a tokenizer on the captions of a dataset's cache: `bpe`, CLIP's cleaning, "
                             "split and framing; `unigram`, SentencePiece-style (NFKC, word marks, </s> after each text), "
                             "for scripts byte-level BPE splits badly.")
    add_config_args(fit)
    fit.add_argument("--model", choices=("bpe", "unigram"), default="bpe", help="the vocabulary model (default: %(default)s)")
    fit.add_argument("--vocab-size", type=int, required=True, help="ids in the vocabulary, special tokens included")
    fit.add_argument("--out", required=True, help="tokenizer.json to write (any fsspec URL)")
    fit.add_argument("--dataset", help="the `data` entry whose cache's captions to use (default: train.dataset)")
    fit.set_defaults(func=_tokenizer_train)


def _train(args) -> int:
    from litpipe.train_text.stage import run

    for line in run(config_from_args(args), resume=args.resume).report:
        print(line)
    return 0


def _text_features(args) -> int:
    from litpipe.errors import UserError
    from litpipe.store import resolve_cache
    from litpipe.train_text.text_feature_job import ensure_text_features

    cfg = config_from_args(args)
    if cfg.train.text_model is None:
        raise UserError("litpipe text-features: pipeline.yaml has no train.text_model; name the frozen text model there")
    cache = resolve_cache(cfg, args.dataset or cfg.train.dataset, None if args.dataset else cfg.train.cache)
    features = ensure_text_features(cfg, cache)
    print(f"text features of cache {cache.id} by {cfg.train.text_model.model}: {features.url}")
    return 0


def _export(args) -> int:
    from litpipe.train_text.export import export_model

    cfg = config_from_args(args)
    folder = export_model(cfg, args.out, args.checkpoint)
    if (folder / "open_clip_config.json").exists():
        how = f"open_clip.create_model_and_transforms('local-dir:{folder}')"
    else:  # a Hugging Face image tower, or heads open_clip cannot hold: image_tower.json says which and why
        why = json.loads((folder / "image_tower.json").read_text()).get("not_open_clip")
        how = (f"litpipe.models.text_tower.load_text_tower('{folder}') and the README's snippet for it"
               + (f" (open_clip cannot hold it: {why})" if why else ""))
    print(f"exported to {folder}; load with {how}")
    return 0


def _tokenizer_train(args) -> int:
    from litpipe.models.tokenizer import train_bpe, train_unigram
    from litpipe.store import load_all, resolve_cache

    cfg = config_from_args(args)
    cache = resolve_cache(cfg, args.dataset or cfg.train.dataset, None if args.dataset else cfg.train.cache)
    captions = (c for caption_list in load_all(cache).captions for c in caption_list)
    fit = train_unigram if args.model == "unigram" else train_bpe
    tokenizer = fit(captions, args.vocab_size, cfg.train.tower.context_length)
    tokenizer.save(args.out)
    print(f"wrote {args.out}: {tokenizer.vocab_size} ids; set train.tokenizer: {args.out} and "
          f"train.tower.vocab_size: {tokenizer.vocab_size}")
    return 0

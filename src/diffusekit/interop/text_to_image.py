"""diffusers' latent text-to-image layout (StableDiffusionPipeline) behind diffusekit's text-model contract.

A Stable Diffusion 1.x / 2.x folder holds unet/ (UNet2DConditionModel), vae/ (AutoencoderKL),
text_encoder/ (transformers CLIPTextModel), tokenizer/ and scheduler/. What StableDiffusionPipeline
does with them, and diffusekit does the same way:
  * prompts are tokenized padded (and truncated) to tokenizer.model_max_length, L tokens;
  * the text encoder's last hidden state (B, L, D) is the UNet's encoder_hidden_states; the
    tokenizer's attention mask reaches the text encoder only when its config says
    use_attention_mask, and the UNet never;
  * classifier-free guidance's unconditional branch is the empty prompt "" (or the negative prompt);
  * the UNet denoises z * scaling_factor of the VAE's latents (nn.autoencoder.DiffusersAutoencoder).
`DiffusersTextUNet` gives the UNet and its text encoder the model contract of a text-conditioned
run (encode_text(prompts) -> keywords, forward(x, t, **keywords)), so the Pipeline's guidance,
samplers and editors drive it unchanged. Reading and loading the folder: interop/diffusers.py.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..config import ConfigError

# the components a latent text-to-image folder must have, and the classes we drive
TEXT_TO_IMAGE_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
TEXT_ENCODERS = ("CLIPTextModel",)        # output[0] is the last hidden state, as the pipeline reads it
# components StableDiffusionPipeline may list that only filter its output images; diffusekit does not run them
NOT_RUN = ("safety_checker", "feature_extractor")
# UNet2DConditionModel options that add inputs StableDiffusionPipeline-style sampling does not give
_UNET_EXTRA_INPUTS = {
    "addition_embed_type": "extra embeddings added to the time embedding (SDXL's 'text_time' takes pooled "
                           "text and image sizes)",
    "class_embed_type": "a class embedding (an upscaler's noise level, an unCLIP image embedding)",
    "num_class_embeds": "class labels",
    "time_cond_proj_dim": "a guidance-scale embedding (a latent consistency model)",
    "encoder_hid_dim_type": "a projection of the text states (an IP-adapter or DeepFloyd-style text input)",
}


def is_text_to_image(classes: dict) -> bool:
    """Whether a model_index's components ({name: class name}) are a text-to-image layout."""
    return "text_encoder" in classes or classes.get("unet") == "UNet2DConditionModel"


def check_text_to_image_components(path: Path, pipeline_class: str, classes: dict) -> None:
    """Refuse, naming the fix, a text-to-image index ({name: class name}) whose components diffusekit cannot drive."""
    where = f"{path} ({pipeline_class})"
    missing = [name for name in TEXT_TO_IMAGE_COMPONENTS if name not in classes]
    if missing:
        raise ConfigError(f"{where} is a text-to-image pipeline without {missing} in model_index.json; diffusekit "
                          f"needs {list(TEXT_TO_IMAGE_COMPONENTS)} (the StableDiffusionPipeline layout). Save the "
                          "pipeline with all of them (StableDiffusionPipeline(...).save_pretrained(path)).")
    if classes["unet"] != "UNet2DConditionModel":
        raise ConfigError(f"{where}: unet is a {classes['unet']}; diffusekit drives text-to-image folders whose unet "
                          "is a UNet2DConditionModel (cross-attention on the text encoder's states).")
    if classes["vae"] != "AutoencoderKL":
        raise ConfigError(f"{where}: vae is a {classes['vae']}; diffusekit drives an AutoencoderKL vae (a VQModel "
                          "or a tiny distilled decoder has another latent space or interface).")
    if classes["text_encoder"] not in TEXT_ENCODERS:
        raise ConfigError(f"{where}: text_encoder is a {classes['text_encoder']}; diffusekit drives "
                          f"{list(TEXT_ENCODERS)} text encoders (the Stable Diffusion 1.x / 2.x layout). For another "
                          "encoder, build a Pipeline from the UNet and VAE yourself with a model that has "
                          "encode_text(prompts) -> {'encoder_hidden_states': ...}.")
    others = sorted(set(classes) - set(TEXT_TO_IMAGE_COMPONENTS) - set(NOT_RUN))
    if others:
        sdxl = " (a second text encoder: an SDXL-style pipeline)" if "text_encoder_2" in others else ""
        raise ConfigError(f"{where} has components {others}{sdxl} besides {list(TEXT_TO_IMAGE_COMPONENTS)}; "
                          "diffusekit does not know what they do, so it will not drive the pipeline without them.")


def check_text_to_image_unet(path: Path, unet_config: dict, latent_channels: int, text_dim: int) -> None:
    """Refuse a UNet2DConditionModel that needs inputs other than latents, a timestep and the text states."""
    extra = [(k, why) for k, why in _UNET_EXTRA_INPUTS.items() if unet_config.get(k) is not None]
    if extra:
        key, why = extra[0]
        raise ConfigError(f"{path}/unet has {key}={unet_config[key]!r}: it takes {why}, which StableDiffusionPipeline-"
                          "style sampling does not give; diffusekit drives UNets conditioned on the text states only.")
    in_channels, out_channels = int(unet_config.get("in_channels", 4)), int(unet_config.get("out_channels", 4))
    if in_channels != latent_channels:
        raise ConfigError(f"{path}/unet takes in_channels={in_channels} but the vae has latent_channels="
                          f"{latent_channels}: an inpainting or depth UNet (latents + mask + masked image, or a "
                          "depth map) is not a text-to-image UNet. Load the plain text-to-image model; "
                          "Pipeline.inpaint fills masks with it.")
    if out_channels not in (in_channels, 2 * in_channels):
        raise ConfigError(f"{path}/unet has in_channels={in_channels} and out_channels={out_channels}; diffusekit "
                          "needs a prediction shaped like its input (or twice the channels, prediction then "
                          "learned variances).")
    cross = unet_config.get("cross_attention_dim")
    dims = set(cross) if isinstance(cross, (list, tuple)) else {cross}
    if dims != {text_dim}:
        raise ConfigError(f"{path}/unet has cross_attention_dim={cross} but the text encoder's states have "
                          f"{text_dim} features; the unet and text_encoder folders come from different models.")


@contextmanager
def _no_progress_bars(transformers):
    """Library code does not print: transformers' loader draws a "Loading weights" bar unless told not to."""
    logging = transformers.utils.logging
    was_on = getattr(logging, "is_progress_bar_enabled", lambda: False)()
    if was_on:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            logging.enable_progress_bar()


class DiffusersTextEncoder(nn.Module):
    """A frozen transformers CLIPTextModel and its tokenizer: prompts -> {"encoder_hidden_states": (B, L, D)}.

    L = the tokenizer's model_max_length: every prompt is padded to it (as StableDiffusionPipeline
    pads), so conditional and unconditional encodings stack in a guided batch.
    """

    def __init__(self, tokenizer, model: nn.Module):
        super().__init__()
        self.tokenizer = tokenizer
        # float32 like the UNet and VAE diffusers loads (an fp16 save would otherwise meet fp32 layers);
        # the Pipeline's precision decides autocast for the network call
        self.model = model.float().eval().requires_grad_(False)
        cfg = model.config
        self.dim = int(cfg.hidden_size)
        self.use_attention_mask = bool(getattr(cfg, "use_attention_mask", False))
        self.max_length = int(tokenizer.model_max_length)
        positions = int(getattr(cfg, "max_position_embeddings", self.max_length))
        if self.max_length > positions:
            raise ConfigError(f"the tokenizer pads prompts to model_max_length={self.max_length} tokens but the text "
                              f"encoder has {positions} positions; set \"model_max_length\": {positions} in "
                              "tokenizer/tokenizer_config.json.")

    @classmethod
    def from_folders(cls, text_encoder_dir: Path, tokenizer_dir: Path, class_name: str) -> "DiffusersTextEncoder":
        """Load text_encoder/ (a transformers `class_name`) and tokenizer/ offline, as save_pretrained wrote them."""
        try:
            import transformers
        except ImportError as e:
            raise ConfigError("a text-to-image diffusers folder needs the transformers package for its text "
                              "encoder; pip install transformers.") from e
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ConfigError(f"{tokenizer_dir} could not be loaded as a tokenizer ({e}); it needs the files "
                              "save_pretrained writes (tokenizer.json, or vocab.json + merges.txt, with "
                              "tokenizer_config.json). Copy the folder's tokenizer/ again.") from e
        try:
            with _no_progress_bars(transformers):
                model = getattr(transformers, class_name).from_pretrained(text_encoder_dir, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"{text_encoder_dir} could not be loaded as a {class_name} ({e}); it needs config.json "
                              "and the weights (model.safetensors) as save_pretrained writes them.") from e
        return cls(tokenizer, model)

    def train(self, mode: bool = True) -> "DiffusersTextEncoder":
        return super().train(False)                                   # frozen: dropout stays off

    def token_count(self, prompt: str) -> int:
        """Tokens of a prompt (start and end tokens included) before it is cut to max_length."""
        return len(self.tokenizer(prompt, truncation=False, verbose=False)["input_ids"])

    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The UNet's text keyword for a list of prompts, on the text encoder's device (without autograd unless
        some of its parameters train: a LoRA adapter on it, while fine-tuning)."""
        if isinstance(prompts, str):
            raise TypeError(f"prompts must be a list of strings, got the string {prompts!r}; wrap it: [{prompts!r}].")
        device = next(self.model.parameters()).device
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt")
        mask = tok["attention_mask"].to(device) if self.use_attention_mask else None
        trains = torch.is_grad_enabled() and any(p.requires_grad for p in self.model.parameters())
        with torch.set_grad_enabled(trains):
            # output[0] is CLIPTextModel's last_hidden_state (after the final layer norm): (B, L, D)
            hidden = self.model(tok["input_ids"].to(device), attention_mask=mask)[0]
        return {"encoder_hidden_states": hidden}


class DiffusersTextUNet(nn.Module):
    """A diffusers UNet2DConditionModel with its text encoder, as a text-conditioned diffusekit model.

    encode_text(prompts) -> {"encoder_hidden_states": (B, L, D)}; forward(x, t, encoder_hidden_states)
    -> the UNet's prediction, t a (B,) float tensor in training-timestep units (fractional values
    are fine: the sinusoidal code is continuous). forward(x, t, prompts=[...]) encodes on the way,
    as models.TextToImageModel does. A UNet that also outputs variances returns its first half.
    """

    def __init__(self, unet: nn.Module, text_encoder: DiffusersTextEncoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder
        self.in_channels = int(unet.config.in_channels)

    @property
    def text(self) -> DiffusersTextEncoder:
        return self.text_encoder

    def encode_text(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        device = next(self.unet.parameters()).device
        return {k: v.to(device) for k, v in self.text_encoder.encode(prompts).items()}

    def forward(self, x: torch.Tensor, t, encoder_hidden_states: torch.Tensor | None = None,
                prompts: Sequence[str] | None = None, encoder_attention_mask: torch.Tensor | None = None):
        if encoder_hidden_states is None:
            # StableDiffusionPipeline has no text-free branch: no prompt is the empty prompt
            prompts = list(prompts) if prompts is not None else [""] * len(x)
            encoder_hidden_states = self.encode_text(prompts)["encoder_hidden_states"]
        elif prompts is not None:
            raise ValueError("give either prompts or encoder_hidden_states, not both.")
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        out = self.unet(x, t, encoder_hidden_states=encoder_hidden_states,
                        encoder_attention_mask=encoder_attention_mask).sample
        return out[:, :self.in_channels]

"""The options several commands share, one word per concept, and the one-line error every command gives.

A command takes only the options it uses: `seed`, `dry_run`, `device` and `precision` are separate
decorators. An option that sets a run-config field names that field once, where it is declared
(`ConfigOption(field="train.lr")`), so the command hands the library dotted keys without a
translation table.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import typing
import warnings

import click

from ..samplers import SAMPLERS
from ..samplers.base import SAMPLER_SPACINGS


REPORT_TO_HELP = ("Also log to TensorBoard (RUN/tensorboard; pip install -e \".[tensorboard]\") or Weights & "
                  "Biases (RUN/wandb or $WANDB_DIR; WANDB_MODE=offline stays local; pip install -e \".[wandb]\").")


def literal_choices(cls, name: str) -> click.Choice:
    """The allowed values of a config field declared as a Literal, as a click choice."""
    return click.Choice([str(v) for v in typing.get_args(typing.get_type_hints(cls)[name])])


class UserError(click.ClickException):
    """A mistake in the input: one line on stderr, exit code 2, no traceback."""
    exit_code = 2


def friendly_errors(fn):
    """Turn the library's input errors into one clean message (no traceback)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ..store import CheckpointError, os_error_line
        from ..config import ConfigError
        try:
            return fn(*args, **kwargs)
        except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
            raise UserError(" ".join(str(e).split("\n")[:1]) if len(str(e)) > 2000 else str(e)) from e
        except OSError as e:
            raise UserError(os_error_line(e)) from e
    return wrapper


def dump(settings: dict) -> None:
    """--dry-run: the resolved settings as JSON on stdout."""
    click.echo(json.dumps(settings, indent=2, default=str))


def note(text: str) -> None:
    """A line about what the command does: the `diffusekit.cli` logger at INFO, which the group prints on
    stderr (stdout keeps only results and --dry-run JSON) and -q silences."""
    logging.getLogger("diffusekit.cli").info(text)


# --- the four options most commands share, each on its own -----------------------------------------
def seed(fn):
    """--seed: for commands that draw random numbers."""
    return click.option("--seed", type=int, default=None,
                        help="Seed for every random choice; the same seed gives the same result [default: 0; "
                             "train --resume: the run's].")(fn)


def dry_run(fn):
    """--dry-run: for commands with settings to resolve."""
    return click.option("--dry-run", is_flag=True, help="Print the resolved settings as JSON and exit.")(fn)


def device(fn):
    """--device: for commands that run a network."""
    from ..device import DEVICES
    return click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
                        help="auto = CUDA, then Apple MPS, then CPU.")(fn)


def precision(fn):
    """--precision: for commands that run a network in a chosen precision."""
    from ..device import PRECISIONS
    return click.option("--precision", type=click.Choice(PRECISIONS), default=None,
                        help="Network precision: auto (bf16 where the device runs it natively: recent x86 CPUs "
                             "with AVX512-BF16/AMX and bf16 GPUs; else fp32), fp32, bf16 (autocast) or fp16 "
                             "(GPU). Default: auto (train --resume: the run's setting).")(fn)


def network_options(fn):
    """--seed, --dry-run, --device and --precision: a command that runs a network with random numbers."""
    return seed(dry_run(device(precision(fn))))


# --- options that set a run-config field --------------------------------------------------------------
class ConfigOption(click.Option):
    """An option that sets one dotted run-config field ("train.lr"); None (not given) leaves it alone."""

    def __init__(self, *args, field: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.field = field


def config_option(*decls, field: str, **kwargs):
    return click.option(*decls, cls=ConfigOption, field=field, **kwargs)


def config_overrides(values: dict) -> dict:
    """The given ConfigOptions of the running command as {dotted field: value}.

    A value that is itself a dict of dotted fields (--text) is merged as it stands."""
    given = {}
    for param in click.get_current_context().command.params:
        value = values.get(param.name)
        if isinstance(param, ConfigOption) and value is not None:
            given.update(value if isinstance(value, dict) else {param.field: value})
    return given


def check_background(ctx, param, value):
    """--background checked when parsed (black, white or R,G,B)."""
    if value is not None:
        from ..data.images import parse_background
        try:
            parse_background(value)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
    return value


def background_option(help_default: str):
    """--background: what transparent pixels become when images are read (black, white or R,G,B)."""
    return click.option("--background", default=None, callback=check_background, metavar="black|white|R,G,B",
                        help="What transparent pixels become when images are read: black, white or R,G,B "
                             f"(0-255 each, e.g. 255,255,255) [default: {help_default}].")


# --- sampling ------------------------------------------------------------------------------------------
def sampler_choice(fn):
    return click.option("--sampler", type=click.Choice(sorted(SAMPLERS)), default="dpmpp_2m", show_default=True,
                        help="Sampler from the registry.")(fn)


def folder_sampler_choice(fn):
    return click.option("--sampler", type=click.Choice(sorted(SAMPLERS)), default=None,
                        help="Sampler from the registry [default: a diffusers folder's own scheduler, with its "
                             "settings; dpmpp_2m for a run]. Another sampler keeps what carries over from the "
                             "folder's scheduler and says what does not.")(fn)


def sampler_options(fn):
    """--sampler, --steps and the sampler's knobs (the registry's names, diffusers' spacings)."""
    fn = click.option("--variance-type", type=click.Choice(["fixed_small", "fixed_large"]), default=None,
                      help="DDPM only: fixed_small = posterior variance beta_tilde (the default here), "
                           "fixed_large = beta_t (the source's sigma_t^2 = beta_t).")(fn)
    fn = click.option("--karras", is_flag=True, help="Karras sigmas (where the sampler allows).")(fn)
    fn = click.option("--eta", type=click.FloatRange(0, 1), default=None,
                      help="Sampler noise where the sampler has it (ddim: 0 deterministic, 1 DDPM-like; "
                           "dpmpp_3m_sde).")(fn)
    fn = click.option("--spacing", type=click.Choice(list(SAMPLER_SPACINGS)), default=None,
                      help="Timestep spacing: diffusers' leading/trailing/linspace, or logsnr (uniform in log-SNR) "
                           "[default: a diffusers folder's own; trailing for a run].")(fn)
    fn = click.option("--steps", type=click.IntRange(1, 10_000), default=None, help="Sampler steps [default: 20].")(fn)
    return folder_sampler_choice(fn)


def resolve_sampler(pipe, sampler):
    """The sampler's name for pipe (None: the diffusers folder's own scheduler, or dpmpp_2m for a run); the
    one line on settings of the folder's scheduler that do not carry over goes to stderr."""
    name, _, text = pipe.default_sampler_options(sampler)
    if text:
        note(text)
    return name


@contextlib.contextmanager
def quiet_notes():
    """Around a library call whose sampler note resolve_sampler has already printed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def sampler_kwargs(spacing, eta, karras, variance_type=None) -> dict:
    """The sampler options as Pipeline keyword arguments (only those given)."""
    kw = {} if spacing is None else {"timestep_spacing": spacing}
    if eta is not None:
        kw["eta"] = eta
    if karras:
        kw["use_karras_sigmas"] = True
    if variance_type is not None:
        kw["variance_type"] = variance_type
    return kw


def timesteps_option(fn):
    return click.option("--timesteps", "timesteps_file", type=click.Path(exists=True, dir_okay=False), default=None,
                        help="A steps file from `diffusekit tune-steps` (replaces --steps and --spacing; default: "
                             "RUN/tuned_steps.json when it was tuned for this sampler and guidance scale and --steps "
                             "is not given).")(fn)


def folder_or_repo_id(ctx, param, value):
    """A run or diffusers folder, or a Hub repo id (owner/name) in the local HF cache, as a local folder path."""
    if value is None:
        return None
    from ..store.hub import resolve_folder
    try:
        folder = resolve_folder(value)
    except FileNotFoundError as e:
        raise click.BadParameter(str(e)) from None
    if not folder.is_dir():
        raise click.BadParameter(f"{value} is a file; give a run folder or a diffusers folder.")
    return str(folder)


def run_argument(fn):
    return click.argument("run", metavar="RUN", callback=folder_or_repo_id)(fn)


def generator(seed_value):
    """The command's torch.Generator: --seed, or 0."""
    from ..device import generator as make
    return make(0 if seed_value is None else seed_value)


def adapter_options(fn):
    """--lora-scale and --base: for commands that load a run which may be a LoRA fine-tune."""
    fn = click.option("--base", "base", type=click.Path(exists=True, file_okay=False), default=None,
                      help="A LoRA run's base model, when it has moved from the path the run records.")(fn)
    return click.option("--lora-scale", type=click.FloatRange(0, 1e3), default=None,
                        help="A LoRA run's adapter share: 0 = the base exactly, 1 = the fine-tuned model "
                             "[default: 1]; refused for a run without an adapter.")(fn)


def load_pipeline(path, device_name="auto", precision_name=None, base=None, lora_scale=None):
    """A run folder, a LoRA run (on its base, or on `base`), a diffusers pipeline folder or a Hub repo id in the
    local HF cache as a Pipeline; lora_scale sets the adapter's share (refused without an adapter)."""
    from ..adapters import is_adapter_folder
    from ..pipeline import Pipeline
    from ..store.hub import resolve_folder
    path = resolve_folder(path)
    precision_name = precision_name or "auto"
    if base is not None:
        if not is_adapter_folder(path):
            raise UserError(f"--base {base} points a LoRA run at its base, and {path} is not a LoRA run (it has no "
                            "adapter.json); drop --base.")
        pipe = Pipeline.load_adapter(path, base=base, device=device_name, precision=precision_name)
    else:
        pipe = Pipeline.open(path, device=device_name, precision=precision_name)
    if lora_scale is not None:
        pipe.lora_scale = lora_scale
    return pipe


def steps_plan(run, pipe, sampler: str, steps, timesteps_file, guidance: float):
    """(steps, tuned timesteps or None) for a sampling command, from the library's choice; its note on stderr."""
    from ..tune import plan_steps
    plan = plan_steps(run, pipe.schedule, sampler, steps, timesteps_file, guidance_scale=guidance)
    if plan.note:
        note(plan.note)
    return plan.num_steps, plan.timesteps

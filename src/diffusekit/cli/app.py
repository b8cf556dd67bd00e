"""The `diffusekit` command group; the commands attach themselves from train, sample and tools."""
from __future__ import annotations

import click

from .. import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(version=__version__, prog_name="diffusekit")
@click.option("--threads", type=click.IntRange(1, 1024), default=None,
              help="CPU threads for PyTorch's operators (torch.set_num_threads) [default: PyTorch's, usually one "
                   "per core]. On a machine that other jobs share, fewer threads than cores is often faster.")
def main(threads):
    """diffusekit: train diffusion models on your images, sample fast, edit with guidance."""
    if threads is not None:
        import torch
        torch.set_num_threads(threads)

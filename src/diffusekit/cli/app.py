"""The `diffusekit` command group; the commands attach themselves from train, sample and tools.

Notes (what a command chose, deprecations) go through the `diffusekit` logger to stderr; -q keeps only
results and errors (warnings and progress bars silenced too), -v adds debug lines. A library user sets the same logger:
`logging.getLogger("diffusekit").setLevel(logging.WARNING)`.
"""
from __future__ import annotations

import logging
import warnings

import click

from .. import __version__
from ..progress import progress_bars


class EchoHandler(logging.Handler):
    """Log records as plain lines on stderr through click (so CliRunner and pipes see them)."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(self.format(record), err=True)


def configure_logging(verbose: int, quiet: bool) -> None:
    """The `diffusekit` logger's level and one stderr handler: -q errors only, default notes, -v debug."""
    logger = logging.getLogger("diffusekit")
    logger.setLevel(logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO)
    if not any(isinstance(h, EchoHandler) for h in logger.handlers):
        logger.addHandler(EchoHandler())
        logger.propagate = False


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(version=__version__, prog_name="diffusekit")
@click.option("--threads", type=click.IntRange(1, 1024), default=None,
              help="CPU threads for PyTorch's operators (torch.set_num_threads) [default: PyTorch's, usually one "
                   "per core]. On a machine that other jobs share, fewer threads than cores is often faster.")
@click.option("-v", "--verbose", count=True, help="More detail on stderr (debug lines of the diffusekit logger).")
@click.option("-q", "--quiet", is_flag=True, help="Only results and errors: no notes, no warnings, no progress bars.")
@click.pass_context
def main(ctx, threads, verbose, quiet):
    """diffusekit: train diffusion models on your images, sample fast, edit with guidance."""
    if verbose and quiet:
        raise click.UsageError("-v and -q contradict each other; give one.")
    configure_logging(verbose, quiet)
    if quiet:
        ctx.with_resource(warnings.catch_warnings())        # restored when the command ends
        warnings.simplefilter("ignore")
        ctx.with_resource(progress_bars(False))             # no progress bars either (diffusekit.progress)
    if threads is not None:
        import torch
        torch.set_num_threads(threads)

"""The ``indicfm`` command. Thin: each subcommand parses options and calls a library function.

Subcommand groups live in their own modules (``tokenizer_cmd``, ``data_cmd``, ``train_cmd``,
``launch_cmd``, ``model_cmd``, ``report_cmd``) so the heavy libraries (jax, sentencepiece, datasets) are only
imported by the command that needs them and ``indicfm --help`` stays fast.
"""

from __future__ import annotations

from typing import Annotated

import typer

from typer.core import TyperGroup

from indicfm.cli import convert_cmd, data_cmd, eval_cmd, launch_cmd, model_cmd, report_cmd, tokenizer_cmd, train_cmd


class _TopLevelGroup(TyperGroup):
    """``indicfm`` whose ``--help`` ends with the optional extras, read from the package metadata.

    Read when the help is shown, not when the command starts: importlib.metadata and the metadata
    lookup would slow every ``indicfm`` command down for a paragraph only ``--help`` prints.
    """

    @property
    def epilog(self) -> str | None:
        from indicfm.extras import help_epilog

        return help_epilog()

    @epilog.setter
    def epilog(self, value: str | None) -> None:
        pass  # click sets it in __init__; the property above is what counts


app = typer.Typer(
    cls=_TopLevelGroup,
    name="indicfm",
    help="Pretrain Mixture-of-Experts language models for the languages of India, on JAX.\n\n"
    "Typical path: tokenizer train → data prepare → train → generate / export hf. "
    "Start with `indicfm quickstart`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(tokenizer_cmd.app, name="tokenizer")
app.add_typer(data_cmd.app, name="data")
app.add_typer(launch_cmd.app, name="launch")
app.add_typer(model_cmd.export_app, name="export")
train_cmd.register(app)
launch_cmd.register(app)
model_cmd.register(app)
report_cmd.register(app)
convert_cmd.register(app)
eval_cmd.register(app)


def _print_version(value: bool) -> None:
    if value:
        from indicfm.extras import version_report

        typer.echo(version_report())
        raise typer.Exit()


@app.callback()
def _top_level(
    version: Annotated[
        bool,
        typer.Option("--version", "-V", callback=_print_version, is_eager=True,
                     help="Print the versions, where indicfm is installed and which optional extras are, then exit."),
    ] = False,
) -> None:  # fmt: skip
    """Options of `indicfm` itself (before the command)."""


def main() -> None:
    """The ``indicfm`` console script (tests call ``app`` through ``CliRunner`` instead)."""
    from indicfm.cli import common

    common.RUN_AS_COMMAND, common.DONE_AND_CLOSED = True, False
    try:
        app()
    except SystemExit as exit:
        if common.DONE_AND_CLOSED:
            common.end_without_teardown(exit.code)
        raise

"""The ``indicfm`` command. Thin: each subcommand parses options and calls a library function.

Subcommand groups live in their own modules (``tokenizer_cmd``, ``data_cmd``, ``train_cmd``,
``launch_cmd``, ``model_cmd``, ``report_cmd``) so the heavy libraries (jax, sentencepiece, datasets) are only
imported by the command that needs them and ``indicfm --help`` stays fast.
"""

from __future__ import annotations

import typer

from indicfm.cli import data_cmd, launch_cmd, model_cmd, report_cmd, tokenizer_cmd, train_cmd

app = typer.Typer(
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


def main() -> None:
    app()

"""`indicfm tokenizer train|eval` (issue 3)."""

import typer

app = typer.Typer(help="Train and evaluate a SentencePiece tokenizer fair to Indic scripts.", no_args_is_help=True)

"""`indicfm data prepare|inspect` (issue 4)."""

import typer

app = typer.Typer(help="Clean, deduplicate, tokenize and pack corpora into a token cache.", no_args_is_help=True)

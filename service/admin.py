"""`rag-admin`: operator commands (keys, cache)."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Administer ragcache.")


@app.command()
def version() -> None:
    """Print the ragcache version."""
    from service import __version__

    typer.echo(__version__)


def main() -> None:
    app()

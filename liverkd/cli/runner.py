"""CLI: see the module that it calls for the work itself."""

import typer

from liverkd.cli.app import app


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def runner(ctx: typer.Context):
    """Embedded device runner: segment each volume arriving in --inbox (see `liverkd runner --help`)."""
    from liverkd.deploy.runner import main

    raise typer.Exit(main(ctx.args, prog="liverkd runner"))

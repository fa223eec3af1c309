import typer

from liverkd import __version__

app = typer.Typer(
    name="liverkd",
    help="Real-time 3-D liver CT segmentation: distil, build engines, infer, profile.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool):
    if value:
        typer.echo(f"liverkd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
):
    pass

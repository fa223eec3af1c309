import typer

from liverkd import __version__

app = typer.Typer(
    name="liverkd",
    help="Real-time 3-D liver CT segmentation: distil, build engines, infer, profile.",
    epilog="Exit codes: 0 success; 1 a file that cannot be used (volume, data set, engine bundle, checkpoint), "
    "named in one line on stderr; 2 a usage error (bad option or argument, unknown preset or config key).",
    context_settings={"help_option_names": ["-h", "--help"]},
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

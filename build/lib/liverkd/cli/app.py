import typer

from liverkd import __version__


def _flags_without_a_type() -> None:
    """typer >= 0.2x shows a type beside every option, `<bool>` beside on/off flags too, which reads
    as if the flag took a value. Flags (and counts) get no type column; every other option keeps its
    own. Older typer (click's help) never showed one, and has no display_type_rich to change."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "_liverkd", False):
        return

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) else shown(self, ctx)

    display_type_rich._liverkd = True
    TyperOption.display_type_rich = display_type_rich


_flags_without_a_type()

QUIET = typer.Option(False, "--quiet", "-q", help="No progress display: results, warnings and errors only.")
"""The one --quiet of every command that shows progress."""

app = typer.Typer(
    name="liverkd",
    help="Real-time 3-D liver CT segmentation: distil, build engines, infer, profile.",
    epilog="Exit codes: 0 success; 1 a file that cannot be used (volume, data set, engine bundle, checkpoint) "
    "or an optional package that is not installed, named in one line on stderr with the extra to install; "
    "2 a usage error (bad option or argument, unknown preset or config key).",
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

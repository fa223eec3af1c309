"""Writing a benchmark's table into docs/results.md between its own markers."""

from __future__ import annotations

from pathlib import Path

from liverkd.core.atomic import write_text


def replace_block(path: Path, name: str, block: str) -> None:
    """Put `block` between `<!-- NAME:begin -->` and `<!-- NAME:end -->` in `path` (appended when absent)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = Path(path).read_text() if Path(path).is_file() else ""
    new = f"{begin}\n{block}{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + new + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + new + "\n"
    write_text(path, text)

"""CLI: `liverkd runner` (the work itself is liverkd.deploy.service)."""

from __future__ import annotations

from pathlib import Path

import typer

from liverkd.cli.app import app
from liverkd.deploy.service.config import RunnerConfig

D = RunnerConfig  # the defaults live there, once


@app.command("runner")
def runner(
    engine: Path = typer.Option(..., "--engine", help="Engine bundle folder (engines/NAME), built on this device."),
    inbox: Path = typer.Option(..., "--inbox", help="Folder to watch; work/, done/ and failed/ are made inside it."),
    outbox: Path = typer.Option(..., "--outbox", help="Folder for masks and stats JSON (not inside the inbox)."),
    failed: Path | None = typer.Option(None, "--failed", help="Failed inputs and errors (default INBOX/failed)."),
    backend: str = typer.Option(D.backend, "--backend", help="auto, onnxruntime, tensorrt, torch or openvino."),
    once: bool = typer.Option(D.once, "--once", help="Process what is in the inbox, then exit."),
    poll_s: float = typer.Option(D.poll_s, "--poll-s", help="Seconds between looks at the inbox."),
    watch: str = typer.Option(
        D.watch, "--watch", help="auto: claim a file the moment it is closed or renamed in (inotify), else poll; poll."
    ),
    settle_s: float = typer.Option(
        D.settle_s, "--settle-s", help="A file without a NAME.done marker is ready once unchanged this long."
    ),
    retry_s: float = typer.Option(
        D.retry_s, "--retry-s", help="First wait after an environment error (outbox full...); doubles up to 60 s."
    ),
    log: Path | None = typer.Option(None, "--log", help="JSON-lines log (default: stdout)."),
    status: Path | None = typer.Option(None, "--status", help="Status JSON for a supervisor, replaced atomically."),
    heartbeat_s: float = typer.Option(D.heartbeat_s, "--heartbeat-s", help="Seconds between heartbeat records."),
    delete_done: bool = typer.Option(D.delete_done, "--delete-done", help="Delete inputs, not keep them in done/."),
    max_voxels: int = typer.Option(D.max_voxels, "--max-voxels", help="Larger volumes go to failed/ (header check)."),
):
    """Embedded device runner: segment each volume arriving in --inbox with one warm engine (docs/runner.md)."""
    from liverkd.deploy.service import serve

    cfg = RunnerConfig(
        engine=engine,
        inbox=inbox,
        outbox=outbox,
        failed=failed,
        backend=backend,
        once=once,
        poll_s=poll_s,
        watch=watch,
        settle_s=settle_s,
        retry_s=retry_s,
        heartbeat_s=heartbeat_s,
        log=log,
        status=status,
        delete_done=delete_done,
        max_voxels=max_voxels,
    )
    raise typer.Exit(serve(cfg))

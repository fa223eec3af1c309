"""CLI: `liverkd export-triton`, `liverkd triton-infer`, `liverkd triton-serve` (the work itself is
liverkd.deploy.triton; docs/serving.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from liverkd.cli.app import app


@app.command("export-triton")
def export_triton(
    engine: str | None = typer.Argument(
        None, help="Engine bundle folder, or a packaged model's name; default: the packaged student-30k."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="The Triton model repository to write into (created if missing)."
    ),
    network: str = typer.Option(
        "onnxruntime",
        "--network",
        help="onnxruntime: the network on Triton's ONNX Runtime backend (NVIDIA's images); python: on liverkd's "
        "ONNX Runtime runner in the Python backend (pytriton's bundled server has no other).",
    ),
    max_batch_size: int = typer.Option(
        4, "--max-batch-size", help="Windows per network call (dynamic batching); 0: the bundle's batch-1 ONNX as is."
    ),
    instances: int = typer.Option(2, "--instances", help="liver_seg processes (pre/post-processing on the CPU)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace liver_seg/ and liver_net/ if there already."),
):
    """Write a Triton model repository: liver_seg (pre/post-processing, Python backend) calling liver_net (network)."""
    from liverkd import models
    from liverkd.deploy.triton.repository import export_repository

    result = export_repository(models.resolve(engine), out, network=network, max_batch_size=max_batch_size,
                               instances=instances, overwrite=overwrite)  # fmt: skip
    typer.echo(result.summary())


@app.command("triton-infer")
def triton_infer(
    inputs: list[Path] = typer.Argument(..., help="NIfTI files (.nii, .nii.gz)."),
    url: str = typer.Option("localhost:8000", "--url", help="The Triton server's HTTP endpoint, host:port."),
    output: Path | None = typer.Option(
        None,
        "-o",
        "--output",
        help="Output .nii.gz of one input, or a folder; default: <input>_liver.nii.gz beside it.",
    ),
    model: str = typer.Option("liver_seg", "--model", help="The pre/post-processing model's name in the repository."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace outputs that exist (never an input)."),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds one volume's round trip may take."),
):
    """Segment NIfTI files on a Triton server (export-triton's repository): the mask, on the input's grid, to a file.

    Each input that fails gets one line on stderr, the others are still sent, and the exit code is 1."""
    from liverkd.core.errors import LiverkdError
    from liverkd.deploy.segment import output_path_for
    from liverkd.deploy.triton.client import TritonSegmenter

    to_folder = output is not None and (output.is_dir() or len(inputs) > 1)
    if output is not None and len(inputs) > 1 and not output.is_dir():
        typer.echo(f"error: {output}: with several inputs, -o is a folder that exists", err=True)
        raise typer.Exit(2)
    failed = 0
    with TritonSegmenter(url, model, timeout=timeout) as client:
        for path in inputs:
            target = output_path_for(path, output) if to_folder else output
            try:
                facts = client.segment_file(path, target, overwrite=overwrite)
            except LiverkdError as e:
                typer.echo(f"error: {e}", err=True)
                failed += 1
                continue
            for note in facts.get("warnings", []):
                typer.echo(f"warning: {path}: {note}", err=True)
            typer.echo(f"{path} -> {facts['output']} (liver {facts['liver_ml']:.1f} mL)")
    if failed:
        raise typer.Exit(1)


@app.command("triton-serve")
def triton_serve(
    repository: Path = typer.Argument(..., help="A model repository (export-triton --network python)."),
    http_port: int = typer.Option(8000, "--http-port", help="HTTP port on 127.0.0.1."),
    grpc_port: int = typer.Option(8001, "--grpc-port", help="gRPC port on 127.0.0.1."),
):
    """Run the tritonserver bundled in NVIDIA's nvidia-pytriton wheel on loopback until Ctrl-C or SIGTERM (needs
    numpy < 2: a separate environment, see docs/serving.md)."""
    import signal
    import time

    from liverkd.deploy.triton.server import LocalTriton

    def stop(signum, frame):
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):  # also when started in the background (SIGINT ignored there)
        signal.signal(sig, stop)
    with LocalTriton(repository, http_port=http_port, grpc_port=grpc_port) as server:
        typer.echo(f"Triton serving {repository} on http://{server.url} (log: {server.log_path}); Ctrl-C stops it")
        try:
            while server.proc.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            typer.echo("stopping tritonserver")
        else:
            typer.echo(f"error: tritonserver exited with code {server.proc.returncode}:\n{server.log_tail()}", err=True)
            raise typer.Exit(1)

"""The `astfad serve` command; FastAPI and uvicorn are imported only when it runs, so the rest of
the command line works without the `serve` extra."""

from __future__ import annotations

from pathlib import Path

import click

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@click.command()
@click.option("--models", "models_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder of *.safetensors detectors (created if missing; fitted models land here).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--api-key", envvar="ASTFAD_API_KEY", default=None,
              help="Require this key on every API route (or set ASTFAD_API_KEY).")
@click.option("--max-queue", type=click.IntRange(min=1), default=32, show_default=True,
              help="Predict requests that may wait; more get 503 with Retry-After.")
@click.option("--max-batch", type=click.IntRange(min=1), default=16, show_default=True,
              help="Images that may share one forward pass (micro-batch). On a CPU whose cost per image "
                   "grows with the batch, 1 can be faster: measure with benchmarks/serve_load.py.")
@click.option("--memory-budget", type=click.FloatRange(min=1), default=2048, show_default=True,
              help="MB of loaded detectors kept in memory (least recently used evicted).")
@click.option("--max-body", type=click.FloatRange(min=0.001), default=64, show_default=True,
              help="Largest request body in MB.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=25_000_000, show_default=True,
              help="Largest image in pixels (checked before decoding).")
@click.option("--cors-origin", "cors_origins", multiple=True,
              help="Allow browser calls from this origin (repeatable; CORS is off by default).")
def serve(models_dir: Path, host: str, port: int, api_key: str | None, max_queue: int, max_batch: int,
          memory_budget: float, max_body: float, max_pixels: int, cors_origins: tuple[str, ...]) -> None:
    """Inspection service: REST API (OpenAPI at /docs) and a web page at /."""
    try:
        import uvicorn

        from astfad.serve.app import create_app
    except ImportError as exc:
        raise click.ClickException(f"astfad serve needs the serve extra ({exc.name} is missing): "
                                   "pip install 'astfad[serve]'") from None
    if host not in LOOPBACK and api_key is None:
        click.echo(click.style("warning: ", fg="yellow") + f"listening on {host} without --api-key: "
                   "anyone who can reach this port can fit, delete and query models", err=True)
    app = create_app(models_dir, api_key, max_queue=max_queue, max_batch=max_batch, memory_budget_mb=memory_budget,
                     max_body_mb=max_body, max_pixels=max_pixels, cors_origins=cors_origins)
    click.echo(f"models: {models_dir.resolve()}  page: http://{host}:{port}/  API docs: http://{host}:{port}/docs")
    uvicorn.run(app, host=host, port=port, log_level="info")

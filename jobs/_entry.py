"""Shared body of the `python -m jobs.<name>` entrypoints."""

from __future__ import annotations

import sys

import typer

from pipeline.cli import app


def run_command(name: str, argv: list[str] | None = None) -> None:
    """Run `splinter <name> ARGS` with this process's arguments (flags or `--config FILE`)."""
    command = typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]
    command.main(args=sys.argv[1:] if argv is None else argv, prog_name=f"python -m jobs.{name}")

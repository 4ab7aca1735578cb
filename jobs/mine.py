"""Ray job entrypoint: `ray job submit --working-dir . -- python -m jobs.mine ARGS...`.

ARGS are exactly those of `splinter mine` (`--config FILE` takes a YAML/TOML file); the driver
attaches to the cluster that runs the job (RAY_ADDRESS is set by Ray for job drivers).
"""

from __future__ import annotations

import sys

import typer

from splinter.cli import app


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    command = typer.main.get_command(app).commands["mine"]  # type: ignore[attr-defined]
    command.main(args=args, prog_name="python -m jobs.mine")


if __name__ == "__main__":
    main()

"""The `corral` command. `serve` runs the server; the model-management verbs talk to it over HTTP."""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__
from .config import Settings


def serve(settings: Settings) -> None:
    import uvicorn

    from .server.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info", access_log=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="corral", description="A local model server for OpenAI's and Ollama's APIs")
    parser.add_argument("--version", action="version", version=f"corral {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="serve the API (address from CORRAL_HOST, default 127.0.0.1:11434)")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        print(f"corral: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        serve(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())

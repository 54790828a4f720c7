"""The `corral` command. `serve` runs the server; the other verbs talk to it over HTTP (CORRAL_HOST)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from . import __version__
from .config import Settings


class CLIError(Exception):
    """A failure to report on one line and exit 1."""


def serve(settings: Settings) -> None:
    import uvicorn

    from .server.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info", access_log=False)


class Client:
    def __init__(self, settings: Settings) -> None:
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
        self.base = f"http://{host}:{settings.port}"
        self.http = httpx.Client(base_url=self.base, timeout=httpx.Timeout(30, read=None))

    def call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kw)
        except httpx.ConnectError:
            raise CLIError(f"could not connect to corral at {self.base}; is `corral serve` running?") from None
        if response.status_code >= 400:
            raise CLIError(_error_text(response))
        return response

    def progress(self, path: str, body: dict[str, Any]) -> None:
        """Follows an NDJSON progress stream, drawing a bar per layer."""
        from tqdm import tqdm

        bars: dict[str, tqdm] = {}
        try:
            with self.http.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    raise CLIError(_error_text(response))
                for line in response.iter_lines():
                    if not line.strip():
                        continue
                    update = json.loads(line)
                    if "error" in update:
                        raise CLIError(update["error"])
                    digest, total = update.get("digest"), update.get("total")
                    if digest and total:
                        bar = bars.get(digest)
                        if bar is None:
                            bar = bars[digest] = tqdm(total=total, unit="B", unit_scale=True,
                                                      desc=update["status"], leave=True)
                        bar.update(update.get("completed", 0) - bar.n)
                    else:
                        print(update["status"])
        except httpx.ConnectError:
            raise CLIError(f"could not connect to corral at {self.base}; is `corral serve` running?") from None
        finally:
            for bar in bars.values():
                bar.close()


def _error_text(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
    except ValueError:
        error = None
    if isinstance(error, dict):
        error = error.get("message")
    return str(error or f"HTTP {response.status_code}")


def _upload(client: Client, path: Path) -> str:
    from .store.store import file_digest

    digest = file_digest(path)
    exists = client.http.head(f"/api/blobs/{digest}")
    if exists.status_code != 200:
        def chunks() -> Iterator[bytes]:
            with open(path, "rb") as fh:
                yield from iter(lambda: fh.read(1 << 20), b"")

        client.call("POST", f"/api/blobs/{digest}", content=chunks())
    return digest


# What a safetensors folder's conversion reads: weights, configs (also 1_Pooling/config.json) and vocabulary.
_FOLDER_FILES = ("*.safetensors", "*.json", "vocab.txt", "*/config.json")


def _upload_folder(client: Client, folder: Path) -> dict[str, str]:
    """Uploads a Hugging Face safetensors folder file by file; the server converts it (relative path -> blob)."""
    paths = sorted({p for pattern in _FOLDER_FILES for p in folder.glob(pattern) if p.is_file()})
    if not any(p.suffix == ".safetensors" for p in paths):
        raise CLIError(f"{folder}: the folder has no .safetensors files; FROM a GGUF file, a model, or a "
                       "Hugging Face safetensors folder")
    uploaded = {}
    for path in paths:
        relative = path.relative_to(folder).as_posix()
        print(f"copying file {relative}")
        uploaded[relative] = _upload(client, path)
    return uploaded


def _resolve(value: str, base: Path) -> Path | None:
    """A FROM or ADAPTER value names a local file when it exists (relative to the Modelfile's folder)."""
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    return path if path.exists() else None


def create(client: Client, name: str, modelfile_path: Path) -> None:
    from .store.modelfile import ModelfileError, parse

    try:
        text = modelfile_path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise CLIError(f"cannot read {modelfile_path}: {exc.strerror}") from None
    try:
        mf = parse(text)
    except ModelfileError as exc:
        raise CLIError(f"{modelfile_path}: {exc}") from None
    base = modelfile_path.resolve().parent
    body: dict[str, Any] = {"model": name}
    files: dict[str, str] = {}
    for i, value in enumerate(mf.from_):
        path = _resolve(value, base)
        if path is None:
            if i > 0:
                raise CLIError(f"{modelfile_path}: the projector file {value!r} does not exist")
            body["from"] = value
        elif path.is_dir():
            if i > 0 or files:
                raise CLIError(f"{modelfile_path}: a safetensors folder must be the only FROM")
            files.update(_upload_folder(client, path))
        else:
            print(f"copying file {path.name}")
            key = path.name if path.name not in files else f"{path.name}#{i}"  # order matters, not the key
            files[key] = _upload(client, path)
    if files:
        if "from" in body:
            raise CLIError(f"{modelfile_path}: FROM a model name cannot be followed by a projector file")
        body["files"] = files
    adapters = {}
    for value in mf.adapters:
        path = _resolve(value, base)
        if path is None or path.is_dir():
            raise CLIError(f"{modelfile_path}: the adapter file {value!r} does not exist")
        adapters[path.name] = _upload(client, path)
    if adapters:
        body["adapters"] = adapters
    for key, value in (("template", mf.template), ("system", mf.system)):
        if value is not None:
            body[key] = value
    if mf.licenses:
        body["license"] = mf.licenses
    if mf.parameters:
        body["parameters"] = mf.parameters
    if mf.messages:
        body["messages"] = mf.messages
    client.progress("/api/create", body)


def _ago(iso: str) -> str:
    seconds = (datetime.now().astimezone() - datetime.fromisoformat(iso)).total_seconds()
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return "just now"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def list_models(client: Client) -> None:
    models = client.call("GET", "/api/tags").json()["models"]
    rows = [("NAME", "ID", "SIZE", "MODIFIED")]
    rows += [(m["name"], m["digest"][:12], _size(m["size"]), _ago(m["modified_at"])) for m in models]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("    ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def show(client: Client, name: str, part: str | None) -> None:
    info = client.call("POST", "/api/show", json={"model": name}).json()
    if part:
        print(info.get(part, ""))
        return
    details = info["details"]
    print("  Model")
    for label, value in (("architecture", details["family"]), ("parameters", details["parameter_size"]),
                         ("context length", info["model_info"].get(f"{details['family']}.context_length", "")),
                         ("quantization", details["quantization_level"])):
        print(f"    {label:<20}{value}")
    print("\n  Capabilities")
    for cap in info["capabilities"]:
        print(f"    {cap}")
    if info.get("parameters"):
        print("\n  Parameters")
        for line in info["parameters"].splitlines():
            print(f"    {line}")


def _until(iso: str) -> str:
    seconds = (datetime.fromisoformat(iso.replace("Z", "+00:00")) - datetime.now().astimezone()).total_seconds()
    if seconds > 100 * 365 * 86400:
        return "Forever"
    for unit, size in (("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} from now"
    return "Stopping..." if seconds <= 0 else f"{int(seconds)} seconds from now"


def ps(client: Client) -> None:
    models = client.call("GET", "/api/ps").json()["models"]
    rows = [("NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL")]
    rows += [(m["name"], m["digest"][:12], _size(m["size"]), "100% CPU", str(m["context_length"]),
              _until(m["expires_at"])) for m in models]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("    ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="corral", description="A local model server for OpenAI's and Ollama's APIs")
    parser.add_argument("--version", action="version", version=f"corral {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="serve the API (address from CORRAL_HOST, default 127.0.0.1:11434)")
    commands.add_parser("list", aliases=["ls"], help="list models")
    p = commands.add_parser("show", help="show a model's details")
    p.add_argument("model")
    for part in ("modelfile", "parameters", "template", "system", "license"):
        p.add_argument(f"--{part}", dest="part", action="store_const", const=part, help=f"print the {part}")
    p = commands.add_parser("create", help="create a model from a Modelfile")
    p.add_argument("model")
    p.add_argument("-f", "--file", default="Modelfile", help="the Modelfile (default ./Modelfile)")
    p = commands.add_parser("cp", help="copy a model under a new name")
    p.add_argument("source")
    p.add_argument("destination")
    p = commands.add_parser("rm", help="remove models")
    p.add_argument("models", nargs="+")
    p = commands.add_parser("run", help="chat with a model in the terminal, or answer one prompt")
    p.add_argument("model")
    p.add_argument("prompt", nargs="*", help="answer this prompt and exit (stdin, when piped, is read too)")
    commands.add_parser("ps", help="list the models loaded now")
    p = commands.add_parser("stop", help="unload a model")
    p.add_argument("model")
    for verb in ("pull", "push"):
        p = commands.add_parser(verb, help=f"{verb} a model {'from' if verb == 'pull' else 'to'} a registry")
        p.add_argument("model")
        p.add_argument("--insecure", action="store_true", help="use plain http")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        print(f"corral: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        serve(settings)
        return 0
    client = Client(settings)
    if args.command == "run":
        from .repl import run

        return run(client.base, args.model, " ".join(args.prompt) if args.prompt else None)
    try:
        if args.command in ("list", "ls"):
            list_models(client)
        elif args.command == "show":
            show(client, args.model, args.part)
        elif args.command == "create":
            create(client, args.model, Path(args.file))
        elif args.command == "cp":
            client.call("POST", "/api/copy", json={"source": args.source, "destination": args.destination})
            print(f"copied '{args.source}' to '{args.destination}'")
        elif args.command == "rm":
            for model in args.models:
                client.call("DELETE", "/api/delete", json={"model": model})
                print(f"deleted '{model}'")
        elif args.command == "ps":
            ps(client)
        elif args.command == "stop":
            client.call("POST", "/api/generate", json={"model": args.model, "keep_alive": 0})
        elif args.command in ("pull", "push"):
            client.progress(f"/api/{args.command}", {"model": args.model, "insecure": args.insecure})
    except CLIError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

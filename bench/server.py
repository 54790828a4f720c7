"""Starting a corral server for a benchmark: a free port, the store it is given, CORRAL_* settings."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(models: Path, log: Path | None = None, **settings: object) -> tuple[subprocess.Popen, str]:
    """`settings` are CORRAL_* variables by their lower-case suffix (`num_parallel=8`). The server's output
    goes to `log`, or nowhere; a server that exits early ends the benchmark with the log's tail."""
    port = free_port()
    env = {**os.environ, "CORRAL_MODELS": str(models), "CORRAL_HOST": f"127.0.0.1:{port}",
           **{f"CORRAL_{name.upper()}": str(value) for name, value in settings.items()}}
    out = log.open("wb") if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "corral", "serve"], env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text()[-3000:] if log is not None else "(no log kept)"
            raise SystemExit(f"corral exited early:\n{tail}")
        try:
            if httpx.get(url + "/", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("corral did not start")

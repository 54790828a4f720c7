"""A real OCI registry for the tests: Debian's `docker-registry` (CNCF distribution), no auth, on a free port.

    from registry_fixture import registry, registry_storage  # noqa: F401

`registry` is the address ("127.0.0.1:<port>", plain HTTP); `registry_storage` is its storage root on disk.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

BINARY = "/usr/bin/docker-registry"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ensure_binary() -> str:
    found = BINARY if os.access(BINARY, os.X_OK) else shutil.which("docker-registry")
    if found:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "docker-registry"]
    try:
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=True)
            subprocess.run(install, env=env, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.fail(f"docker-registry is missing and could not be installed (apt-get install docker-registry): {exc}")
    if not os.access(BINARY, os.X_OK):
        pytest.fail(f"apt-get installed docker-registry but {BINARY} is missing")
    return BINARY


@pytest.fixture(scope="session")
def registry_storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("registry-storage")


@pytest.fixture(scope="session")
def registry(registry_storage: Path, tmp_path_factory: pytest.TempPathFactory):
    binary = _ensure_binary()
    work = tmp_path_factory.mktemp("registry")
    port = _free_port()
    config = work / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n"
        "  level: warn\n"
        "storage:\n"
        "  filesystem:\n"
        f"    rootdirectory: {registry_storage}\n"
        "  delete:\n"
        "    enabled: true\n"
        "http:\n"
        f"  addr: 127.0.0.1:{port}\n"
    )
    log_path = work / "registry.log"
    log = open(log_path, "wb")
    process = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=log)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                pytest.fail(f"docker-registry exited early:\n{log_path.read_text()}")
            try:
                if httpx.get(f"http://{address}/v2/", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"docker-registry did not answer on {address}:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield address
    finally:
        process.kill()
        process.wait()
        log.close()

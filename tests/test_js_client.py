"""The README's JavaScript example, run with the npm `openai` package against the real server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import MODEL

ROOT = Path(__file__).resolve().parent.parent


def test_readme_javascript_example(server):
    if shutil.which("node") is None:
        pytest.fail("node is required (make test installs the npm packages)")
    assert (ROOT / "node_modules" / "openai").is_dir(), "run `make test` (npm ci) first"
    env = {**os.environ, "CORRAL_BASE_URL": server.url + "/v1/"}
    out = subprocess.run(["node", "examples/quickstart.mjs"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["chat"] and result["completion"]
    assert result["chatFinish"] in ("stop", "length")
    assert MODEL in result["models"] and result["model"] == MODEL

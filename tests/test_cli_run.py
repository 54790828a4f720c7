"""`corral run`, `ps` and `stop` as a user types them: an interactive session driven through a terminal
(pexpect), one-shot prompts given as arguments or piped, and a missing model."""

from __future__ import annotations

import os
import subprocess
import sys

import pexpect
import pytest

from conftest import MODEL


@pytest.fixture(scope="module")
def env(server):
    return {**os.environ, "CORRAL_HOST": server.url.removeprefix("http://")}


def corral(env, *args, stdin=""):
    return subprocess.run([sys.executable, "-m", "corral", *args], env=env, input=stdin, capture_output=True,
                          text=True, timeout=300)


def test_an_interactive_session(env):
    child = pexpect.spawn(sys.executable, ["-m", "corral", "run", MODEL], env=env, encoding="utf-8", timeout=120)
    try:
        child.expect_exact(">>> ")
        child.sendline("/set parameter num_predict 6")
        child.expect_exact("Set parameter 'num_predict' to '6'")
        child.expect_exact(">>> ")
        child.sendline("/set parameter temperature 0")
        child.expect_exact(">>> ")
        child.sendline("Hello there")
        child.expect_exact(">>> ")
        first = child.before.split("Hello there", 1)[1].strip()
        assert first  # a streamed answer
        child.sendline('"""')
        child.expect_exact("... ")
        child.sendline("Two lines:")
        child.expect_exact("... ")
        child.sendline('the second."""')
        child.expect_exact(">>> ")
        child.sendline("/clear")
        child.expect_exact("Cleared session context")
        child.expect_exact(">>> ")
        child.sendline("Hello there")  # same question, history cleared: the same greedy answer
        child.expect_exact(">>> ")
        assert child.before.split("Hello there", 1)[1].strip() == first
        child.sendline("/nonsense")
        child.expect_exact("Unknown command")
        child.expect_exact(">>> ")
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_one_shot_prompts_and_pipes(env):
    out = corral(env, "run", MODEL, "Say", "hi")
    assert out.returncode == 0 and out.stdout.strip() and ">>>" not in out.stdout
    piped = corral(env, "run", MODEL, stdin="Why is the sky blue?\n")
    assert piped.returncode == 0 and piped.stdout.strip()


def test_a_missing_model_is_reported(env):
    out = corral(env, "run", "nope:1b", "hi")
    assert out.returncode == 1 and "nope:1b" in out.stderr and "not found" in out.stderr


def test_ps_and_stop(env):
    assert corral(env, "run", MODEL, "hi").returncode == 0
    table = corral(env, "ps").stdout.splitlines()
    assert table[0].split()[:3] == ["NAME", "ID", "SIZE"] and table[1].startswith(MODEL)
    assert corral(env, "stop", MODEL).returncode == 0
    assert len(corral(env, "ps").stdout.splitlines()) == 1
    missing = corral(env, "stop", "nope:1b")
    assert missing.returncode == 1 and "nope:1b" in missing.stderr

"""`corral run`: a chat in the terminal over /api/chat, or one answer when a prompt is given or piped.

Interactive commands, as in `ollama run`: `/bye`, `/clear` (forget the conversation), `/set parameter
NAME VALUE` (any option /api/chat takes), `/set system TEXT`, `/help`. A line of `\"\"\"` starts a
multi-line message, ended by a line that ends with `\"\"\"`. Ctrl-C stops an answer; Ctrl-D leaves.
"""

from __future__ import annotations

import itertools
import json
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TextIO

import httpx

HELP = """Available commands:
  /set parameter NAME VALUE   set an option for the following answers (e.g. temperature 0.2, num_predict 64)
  /set system TEXT            set the system message
  /clear                      forget the conversation so far
  /bye                        exit
  /help, /?                   this help
Use \"\"\" to begin and end a message of several lines."""


class RunError(Exception):
    """A failure to report on one line."""


class Spinner:
    """A spinner on stderr while the model loads, only when stderr is a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._spin, daemon=True)

    def __enter__(self) -> Spinner:
        if self.stream.isatty():
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()
            self.stream.write("\r \r")
            self.stream.flush()

    def _spin(self) -> None:
        for frame in itertools.cycle("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"):
            self.stream.write(f"\r{frame}")
            self.stream.flush()
            if self.stop.wait(0.1):
                return


def _error(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error") or f"HTTP {response.status_code}")
    except ValueError:
        return f"HTTP {response.status_code}"


def _coerce(value: str) -> Any:
    """`/set parameter` values: numbers and booleans as JSON, anything else as text."""
    try:
        return json.loads(value)
    except ValueError:
        return value


class Session:
    def __init__(self, http: httpx.Client, model: str, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
        self.http, self.model, self.out, self.err = http, model, out, err
        self.messages: list[dict[str, str]] = []
        self.options: dict[str, Any] = {}
        self.system: str | None = None

    def ensure_model(self) -> None:
        """Checks the model exists (pulling it when it does not) and loads it, with a spinner."""
        shown = self.http.post("/api/show", json={"model": self.model})
        if shown.status_code == 404:
            self.err.write(f"model '{self.model}' is not here; pulling it\n")
            with self.http.stream("POST", "/api/pull", json={"model": self.model}) as response:
                if response.status_code >= 400:
                    response.read()
                    raise RunError(f"model '{self.model}' not found, and pulling it failed: {_error(response)}")
                for line in response.iter_lines():
                    update = json.loads(line) if line.strip() else {}
                    if "error" in update:
                        raise RunError(f"model '{self.model}' not found, and pulling it failed: {update['error']}")
        elif shown.status_code >= 400:
            raise RunError(_error(shown))
        with Spinner(self.err):
            loaded = self.http.post("/api/chat", json={"model": self.model, "messages": []})
        if loaded.status_code >= 400:
            raise RunError(_error(loaded))

    def ask(self, text: str) -> str:
        """Sends one user message with the conversation so far; streams the answer to `out`."""
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        messages.append({"role": "user", "content": text})
        body = {"model": self.model, "messages": messages, "stream": True}
        if self.options:
            body["options"] = self.options
        answer = []
        with self.http.stream("POST", "/api/chat", json=body) as response:
            if response.status_code >= 400:
                response.read()
                raise RunError(_error(response))
            for line in response.iter_lines():
                if not line.strip():
                    continue
                chunk = json.loads(line)
                if "error" in chunk:
                    raise RunError(chunk["error"])
                piece = chunk.get("message", {}).get("content", "")
                answer.append(piece)
                self.out.write(piece)
                self.out.flush()
        self.out.write("\n")
        reply = "".join(answer)
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        return reply

    def command(self, line: str) -> bool:
        """Runs a /command; False when the session should end."""
        words = line.split(maxsplit=3)
        name = words[0].lower()
        if name in ("/bye", "/exit"):
            return False
        if name in ("/help", "/?"):
            self.out.write(HELP + "\n")
        elif name == "/clear":
            self.messages.clear()
            self.out.write("Cleared session context\n")
        elif name == "/set" and len(words) == 4 and words[1] == "parameter":
            self.options[words[2]] = _coerce(words[3])
            self.out.write(f"Set parameter '{words[2]}' to '{words[3]}'\n")
        elif name == "/set" and len(words) >= 3 and words[1] == "system":
            self.system = line.split(maxsplit=2)[2]
            self.out.write("Set system message.\n")
        else:
            self.out.write(f"Unknown command '{line.strip()}'. Type /? for help\n")
        return True


def _messages(read: Callable[[str], str]) -> Iterator[str]:
    """Messages typed at the prompt, until end of input; triple quotes open and close a multi-line one."""
    while True:
        try:
            line = read(">>> ")
            if not line.startswith('"""'):
                yield line
                continue
            parts = [line[3:]]
            while not parts[-1].endswith('"""'):
                parts.append(read("... "))
            parts[-1] = parts[-1][:-3]
            yield "\n".join(parts).strip("\n")
        except EOFError:
            return


def interactive(session: Session) -> None:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    for message in _messages(input):
        if not message.strip():
            continue
        if message.startswith("/"):
            if not session.command(message):
                return
            continue
        try:
            session.ask(message)
        except KeyboardInterrupt:
            session.out.write("\n")
        except RunError as exc:
            session.err.write(f"Error: {exc}\n")
    session.out.write("\n")


def run(base_url: str, model: str, prompt: str | None) -> int:
    """`corral run`: one answer when a prompt is given or stdin is piped, else an interactive chat."""
    with httpx.Client(base_url=base_url, timeout=httpx.Timeout(30, read=None)) as http:
        session = Session(http, model)
        try:
            session.ensure_model()
            if not sys.stdin.isatty():  # piped text is the prompt, or follows it
                piped = sys.stdin.read().strip()
                prompt = "\n\n".join(p for p in (prompt, piped) if p) or prompt
            if prompt is not None:
                session.ask(prompt)
            else:
                interactive(session)
        except httpx.ConnectError:
            sys.stderr.write(f"Error: could not connect to corral at {base_url}; is `corral serve` running?\n")
            return 1
        except RunError as exc:
            sys.stderr.write(f"Error: {exc}\n")
            return 1
        except KeyboardInterrupt:
            return 130
    return 0

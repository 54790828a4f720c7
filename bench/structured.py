"""Decode speed with a grammar active and with top_logprobs=20, as ratios of plain decoding in one run.

    .venv/bin/python bench/structured.py [--tokens 200] [--rounds 3]

A corral server is started on a free port with a temporary store; single streamed chat completions are
timed from their first to their last token. Plain and top_logprobs runs ban end-of-generation tokens so
they decode exactly `--tokens`; the grammar run asks for a JSON object whose one string property holds the
story (end-of-generation stays allowed there, since the grammar ends with it), so the grammar is active for
every token and the rate is taken over however many tokens the model writes; the tool-call run is the same
with a required call of a `tell(story)` function whose story must be long (`minLength`), so the call
runs to the token budget (its tokens stream as argument deltas). The
variants alternate round by round, and each ratio is the median of its per-round ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path

from throughput import MODEL, PROMPT, concurrent, start_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    plain = {"temperature": 0}
    variants = {
        "plain": plain,
        "top_logprobs=20": {**plain, "logprobs": True, "top_logprobs": 20},
        "json_schema grammar": {
            "temperature": 0,
            "logit_bias": {},
            "response_format": {"type": "json_schema", "json_schema": {"name": "story", "schema": {
                "type": "object", "properties": {"story": {"type": "string"}},
                "required": ["story"], "additionalProperties": False}}},
        },
        "tool call (required)": {
            "temperature": 0,
            "logit_bias": {},
            "tools": [{"type": "function", "function": {"name": "tell", "description": "Tell a story",
                                                        "parameters": {"type": "object", "properties": {
                                                            "story": {"type": "string", "minLength": 2000}},
                                                        "required": ["story"]}}}],
            "tool_choice": "required",
            "parallel_tool_calls": False,
        },
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(Path(tmp) / "models", parallel=1, threads=args.threads)
        try:
            asyncio.run(concurrent(url, 1, 16, plain))
            for _ in range(args.rounds):
                for name, extra in variants.items():
                    _, [result] = asyncio.run(concurrent(url, 1, args.tokens, extra))
                    if result.error:
                        raise SystemExit(f"{name}: {result.error}")
                    rates[name].append(result.decode_rate)
        finally:
            proc.terminate()
            proc.wait()
    print(f"model {MODEL}, {args.threads} threads, {args.tokens} tokens, prompt: {PROMPT!r}")
    print(f"{'variant':<24}{'tok/s':>10}{'vs plain':>10}")
    for name in variants:
        ratio = statistics.median(r / p for r, p in zip(rates[name], rates["plain"]))
        print(f"{name:<24}{statistics.median(rates[name]):>10.1f}{ratio:>10.2f}")


if __name__ == "__main__":
    main()

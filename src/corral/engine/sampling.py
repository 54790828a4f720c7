"""Sampling parameters and the `llama_sampler` chain built from them (one chain per sequence)."""

from __future__ import annotations

import bisect
import ctypes
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import llama_cpp.llama_cpp as ll
import numpy as np

log = logging.getLogger("corral.engine")


@dataclass(frozen=True)
class GrammarTrigger:
    """Makes a grammar lazy: the output is free until a trigger appears, and from there on the grammar
    holds. A trigger is one of `markers` anywhere in the output (`<tool_call>`), or with `at_start` a
    `{` or `[` opening the output. This is how a tool call is enforced while a plain answer stays free."""

    markers: tuple[bytes, ...] = ()
    at_start: bool = False


@dataclass(frozen=True)
class SamplingParams:
    """Defaults are Ollama's, so a request that sets nothing samples as it would there."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: str | None = None  # GBNF with a `root` rule: only text it accepts can be sampled
    grammar_trigger: GrammarTrigger | None = None  # when set, the grammar holds from the trigger on

    def with_seed(self, seed: int | None) -> "SamplingParams":
        return replace(self, seed=seed)

    def resolved_seed(self) -> int:
        """The 32-bit seed for llama.cpp; a request without a seed gets one drawn here.

        Any integer maps into 0..2**32-2: 2**32-1 is llama.cpp's "pick a random seed" value.
        """
        return (self.seed if self.seed is not None else secrets.randbits(32)) % 0xFFFFFFFF


class GrammarError(ValueError):
    """llama.cpp refused a grammar."""


def build_chain(params: SamplingParams, n_vocab: int, n_ctx: int) -> ctypes.c_void_p:
    """The chain order follows llama.cpp's server: bias, penalties, truncation, temperature, draw."""
    chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
    add = lambda s: ll.llama_sampler_chain_add(chain, s)  # noqa: E731
    if params.logit_bias:
        items = (ll.llama_logit_bias * len(params.logit_bias))()
        for i, (token, bias) in enumerate(params.logit_bias.items()):
            items[i].token = token
            items[i].bias = bias
        add(ll.llama_sampler_init_logit_bias(n_vocab, len(params.logit_bias), items))
    penalised = (
        params.repeat_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0
    )
    if penalised and params.repeat_last_n != 0:
        last_n = n_ctx if params.repeat_last_n < 0 else min(params.repeat_last_n, n_ctx)
        add(
            ll.llama_sampler_init_penalties(
                n_vocab,
                last_n,
                params.repeat_penalty,
                params.frequency_penalty,
                params.presence_penalty,
            )
        )
    if params.temperature <= 0.0:
        add(ll.llama_sampler_init_greedy())
        return chain
    if 0 < params.top_k < n_vocab:  # a top-k of the whole vocabulary or more keeps everything
        add(ll.llama_sampler_init_top_k(params.top_k))
    if params.typical_p < 1.0:
        add(ll.llama_sampler_init_typical(params.typical_p, 1))
    if params.top_p < 1.0:
        add(ll.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0.0:
        add(ll.llama_sampler_init_min_p(params.min_p, 1))
    add(ll.llama_sampler_init_temp(params.temperature))
    add(ll.llama_sampler_init_dist(params.resolved_seed()))
    return chain


def free_chain(chain: ctypes.c_void_p | None) -> None:
    if chain:
        ll.llama_sampler_free(chain)


_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])  # llama_token_data


class SequenceSampler:
    """One sequence's sampling: its chain and, for structured output, its grammar.

    A grammar check over the whole vocabulary costs more than decoding a small model's token, so the
    grammar is applied the way llama.cpp's own server does it: sample with the chain first, check only
    the chosen token against the grammar, and constrain the whole distribution only when it is refused.
    The result is the same as constraining first; the common case costs one token check.
    """

    def __init__(
        self,
        params: SamplingParams,
        n_vocab: int,
        n_ctx: int,
        vocab: ctypes.c_void_p,
        piece: Callable[[int], bytes] = lambda token: b"",
    ) -> None:
        self.n_vocab = n_vocab
        self.vocab = vocab
        self.chain = build_chain(params, n_vocab, n_ctx)
        self.grammar = None
        self.lazy: _LazyGrammar | None = None
        if params.grammar is not None:
            grammar = self._grammar(params.grammar, "root")  # parsed now, so a bad grammar fails the job early
            if params.grammar_trigger is None:
                self.grammar = grammar
            else:
                free_chain(grammar)
                self.lazy = _LazyGrammar(params.grammar, params.grammar_trigger, piece)
            self._cand = np.zeros(n_vocab, dtype=_TOKEN_DATA)
            self._one = np.zeros(1, dtype=_TOKEN_DATA)

    def _grammar(self, text: str, root: str) -> ctypes.c_void_p:
        grammar = ll.llama_sampler_init_grammar(self.vocab, text.encode(), root.encode())
        if not grammar:
            free_chain(self.chain)
            self.chain = None
            raise GrammarError("llama.cpp could not parse the grammar")
        return grammar

    def sample(self, ctx: ctypes.c_void_p, idx: int) -> int:
        if self.grammar is None:
            token = ll.llama_sampler_sample(self.chain, ctx, idx)
            if self.lazy is not None:
                self._watch(token)
            return token
        logits = np.ctypeslib.as_array(ll.llama_get_logits_ith(ctx, idx), shape=(self.n_vocab,))
        token = self._apply(logits, constrained=False)
        if not self._allows(self.grammar, token):
            token = self._apply(logits, constrained=True)
        ll.llama_sampler_accept(self.grammar, token)
        ll.llama_sampler_accept(self.chain, token)
        return token

    def _allows(self, grammar: ctypes.c_void_p, token: int) -> bool:
        one = self._view(self._one)
        self._one[0] = (token, 1.0, 0.0)
        ll.llama_sampler_apply(grammar, ctypes.byref(one))
        return bool(np.isfinite(self._one[0]["logit"]))

    def _watch(self, token: int) -> None:
        """Activates a lazy grammar once its trigger shows up in the output.

        The grammar starts where the trigger starts, which may be inside a token (` <tool_call>`); the
        text of that token before the trigger becomes a literal in front of the grammar's root. The tokens
        from there on are replayed into the grammar, each checked first: llama.cpp aborts the process on
        accepting a token its grammar refuses, so an output that strayed stays unconstrained instead."""
        lazy = self.lazy
        assert lazy is not None
        start = lazy.add(token)
        if start is None:
            return
        self.lazy = None
        tokens, prefix = lazy.from_trigger(start)
        if prefix is None:
            log.warning("lazy grammar not applied: the trigger split a character")
            return
        text = lazy.grammar + (f"corral-lazy ::= {_literal(prefix)} root\n" if prefix else "")
        grammar = ll.llama_sampler_init_grammar(self.vocab, text.encode(), b"corral-lazy" if prefix else b"root")
        if not grammar:
            log.warning("lazy grammar not applied: llama.cpp could not parse it")
            return
        for t in tokens:
            if not self._allows(grammar, t):
                log.warning("lazy grammar not applied: the output strayed from it before it started")
                free_chain(grammar)
                return
            ll.llama_sampler_accept(grammar, t)
        self.grammar = grammar

    def _apply(self, logits: np.ndarray, constrained: bool) -> int:
        cand = self._cand
        cand["id"] = np.arange(self.n_vocab, dtype=np.int32)
        cand["logit"] = logits
        cand["p"] = 0.0
        array = self._view(cand)
        if constrained:
            ll.llama_sampler_apply(self.grammar, ctypes.byref(array))
        ll.llama_sampler_apply(self.chain, ctypes.byref(array))
        return int(cand[array.selected]["id"])

    @staticmethod
    def _view(data: np.ndarray) -> ll.llama_token_data_array:
        return ll.llama_token_data_array(
            data=data.ctypes.data_as(ll.llama_token_data_p), size=len(data), selected=-1, sorted=False
        )

    def free(self) -> None:
        free_chain(self.chain)
        free_chain(self.grammar)
        self.chain = self.grammar = None


class _LazyGrammar:
    """The output of one sequence while its grammar waits for its trigger."""

    def __init__(self, grammar: str, trigger: GrammarTrigger, piece: Callable[[int], bytes]) -> None:
        self.grammar, self.trigger, self.piece = grammar, trigger, piece
        self.text = bytearray()
        self.tokens: list[int] = []
        self.starts: list[int] = []  # where each token's bytes start in `text`
        self.opened = False  # some non-blank text was written: `at_start` can no longer fire

    def add(self, token: int) -> int | None:
        """Adds a sampled token; returns where the trigger starts once it has appeared."""
        start = len(self.text)
        self.tokens.append(token)
        self.starts.append(start)
        self.text += self.piece(token)
        found: list[int] = []
        if self.trigger.at_start and not self.opened:
            body = self.text.lstrip()
            if body:
                self.opened = True
                if body[:1] in (b"{", b"["):
                    found.append(len(self.text) - len(body))
        for marker in self.trigger.markers:
            at = self.text.find(marker, max(0, start - len(marker) + 1))
            if at >= 0:
                found.append(at)
        return min(found) if found else None

    def from_trigger(self, at: int) -> tuple[list[int], str | None]:
        """The tokens from the one holding the trigger's start, and that token's text before the trigger
        (None when that text is not whole characters)."""
        k = bisect.bisect_right(self.starts, at) - 1
        try:
            prefix = bytes(self.text[self.starts[k]:at]).decode("utf-8")
        except UnicodeDecodeError:
            return [], None
        return self.tokens[k:], prefix


def _literal(text: str) -> str:
    """A GBNF literal for `text`, every character escaped so the grammar stays plain ASCII."""
    return '"' + "".join(f"\\u{ord(c):04X}" if ord(c) < 0x10000 else f"\\U{ord(c):08X}" for c in text) + '"'

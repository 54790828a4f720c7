"""Sampling parameters and the `llama_sampler` chain built from them (one chain per sequence)."""

from __future__ import annotations

import ctypes
import secrets
from dataclasses import dataclass, field, replace

import llama_cpp.llama_cpp as ll


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

    def with_seed(self, seed: int | None) -> "SamplingParams":
        return replace(self, seed=seed)

    def resolved_seed(self) -> int:
        """The 32-bit seed for llama.cpp; a request without a seed gets one drawn here.

        Any integer maps into 0..2**32-2: 2**32-1 is llama.cpp's "pick a random seed" value.
        """
        return (self.seed if self.seed is not None else secrets.randbits(32)) % 0xFFFFFFFF


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
                last_n, params.repeat_penalty, params.frequency_penalty, params.presence_penalty
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

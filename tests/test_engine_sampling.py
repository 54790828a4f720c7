"""Seeds and chain construction."""

from corral.engine.sampling import SamplingParams, build_chain, free_chain


def test_seeds_map_into_llama_range_and_never_to_random():
    assert SamplingParams(seed=42).resolved_seed() == 42
    assert SamplingParams(seed=-1).resolved_seed() != 0xFFFFFFFF
    assert SamplingParams(seed=2**32 - 1).resolved_seed() != 0xFFFFFFFF
    assert 0 <= SamplingParams(seed=2**70).resolved_seed() < 0xFFFFFFFF
    assert SamplingParams(seed=5).resolved_seed() == SamplingParams(seed=5).resolved_seed()


def test_extreme_values_build_a_chain():
    params = SamplingParams(top_k=10**12, repeat_last_n=10**12, logit_bias={1: 5.0})
    chain = build_chain(params, n_vocab=49152, n_ctx=1024)
    assert chain
    free_chain(chain)

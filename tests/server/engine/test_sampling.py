"""Per-row token selection: each knob does what it says, and a row's result never depends on its neighbours."""

from __future__ import annotations

import torch

from server.engine.sampling import SamplingState, new_generator, process_logits, sample
from server.engine.types import SamplingParams

VOCAB = 50


def state_for(params: list[SamplingParams], prompts: list[list[int]] | None = None) -> SamplingState:
    prompts = prompts or [[] for _ in params]
    generators = [new_generator(p.seed if p.seed is not None else 0) for p in params]
    return SamplingState.build(params, generators, prompts, VOCAB, torch.device("cpu"))


def logits_rows(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn((n, VOCAB), generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_rows_take_the_argmax() -> None:
    logits = logits_rows(3)
    state = state_for([SamplingParams(temperature=0.0)] * 3)
    assert sample(process_logits(logits, state), state).tolist() == logits.argmax(-1).tolist()


def test_top_k_one_and_tiny_top_p_are_greedy_even_at_high_temperature() -> None:
    logits = logits_rows(4)
    params = [SamplingParams(temperature=5.0, top_k=1, seed=i) for i in range(2)]
    params += [SamplingParams(temperature=5.0, top_p=1e-6, seed=i) for i in range(2)]
    state = state_for(params)
    assert sample(process_logits(logits, state), state).tolist() == logits.argmax(-1).tolist()


def test_top_k_restricts_draws_to_the_k_best() -> None:
    logits = logits_rows(1).expand(200, VOCAB).contiguous()
    state = state_for([SamplingParams(temperature=10.0, top_k=3, seed=i) for i in range(200)])
    allowed = set(torch.topk(logits[0], 3).indices.tolist())
    drawn = set(sample(process_logits(logits, state), state).tolist())
    assert drawn <= allowed and len(drawn) > 1


def test_min_p_drops_unlikely_tokens() -> None:
    logits = torch.full((100, VOCAB), -10.0)
    logits[:, 7] = 0.0
    logits[:, 8] = -0.5
    state = state_for([SamplingParams(temperature=1.0, min_p=0.3, seed=i) for i in range(100)])
    assert set(sample(process_logits(logits, state), state).tolist()) == {7, 8}


def test_logit_bias_forces_and_bans_tokens() -> None:
    logits = logits_rows(2)
    best = logits.argmax(-1).tolist()
    params = [
        SamplingParams(temperature=0.0, logit_bias={3: 100.0}),
        SamplingParams(temperature=0.0, logit_bias={best[1]: -100.0}),
    ]
    state = state_for(params)
    chosen = sample(process_logits(logits, state), state).tolist()
    assert chosen[0] == 3 and chosen[1] != best[1]


def test_penalties_follow_counts_and_prompt() -> None:
    logits = torch.zeros((3, VOCAB))
    logits[:, 4] = 2.0
    params = [
        SamplingParams(temperature=0.0, frequency_penalty=1.0),
        SamplingParams(temperature=0.0, presence_penalty=1.5),
        SamplingParams(temperature=0.0, repetition_penalty=2.0),
    ]
    state = state_for(params, prompts=[[], [], [4]])
    state.record(torch.tensor([4, 4, 9]))
    state.record(torch.tensor([4, 9, 9]))
    out = process_logits(logits, state)
    assert out[0, 4] == 2.0 - 2 * 1.0  # generated twice
    assert out[1, 4] == 2.0 - 1.5 and out[1, 9] == -1.5  # presence: once is enough
    assert out[2, 4] == 1.0  # in the prompt: 2.0 / 2
    assert out[2, 9] == 0.0  # zero logit: penalty has no effect
    assert out[0, 9] == 0.0  # untouched tokens


def test_a_rows_draw_does_not_depend_on_its_neighbours() -> None:
    logits = logits_rows(5, seed=3)
    target = SamplingParams(temperature=0.8, top_p=0.9, seed=42)
    alone_state = state_for([target])
    alone = sample(process_logits(logits[2:3], alone_state), alone_state).item()
    neighbours = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.3, top_k=4, seed=1),
        target,
        SamplingParams(temperature=0.7, min_p=0.1, seed=5),
        SamplingParams(temperature=1.0, seed=9),
    ]
    batch_state = state_for(neighbours)
    assert sample(process_logits(logits, batch_state), batch_state)[2].item() == alone


def test_filter_and_concatenate_keep_rows_aligned() -> None:
    a = state_for([SamplingParams(temperature=0.0, frequency_penalty=1.0), SamplingParams(temperature=0.5, seed=1)])
    b = state_for([SamplingParams(temperature=0.9, logit_bias={1: 2.0}, seed=2)])
    joined = SamplingState.concatenate([a, b])
    assert joined.output_counts is not None and joined.output_counts.shape == (3, VOCAB)
    assert joined.logit_bias is not None and joined.logit_bias[2, 1] == 2.0 and joined.logit_bias[0].abs().sum() == 0
    kept = joined.filter(torch.tensor([2, 0]), [2, 0])
    assert [p.temperature for p in kept.params] == [0.9, 0.0]
    assert kept.logit_bias is not None and kept.logit_bias[0, 1] == 2.0

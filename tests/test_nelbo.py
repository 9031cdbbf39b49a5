"""The NELBO of `objectives.nelbo`, checked by enumeration on a toy model (vocabulary of a few tokens, n <= 3,
K <= 3): every reveal-step assignment of x0 is one sampler trajectory, so the exact `-log p_model(x0)` and the exact
expectation of the estimator are finite sums.

* the estimator's exact expectation (the production code on every assignment and step) equals the ELBO computed
  independently from the sampler's own insertion probabilities `P_k(m) = Σ_g' p(g') Binomial(m; g', q_k)`;
* it bounds `-log p_model(x0)` from above, and the old CE sum overstates it;
* the Monte Carlo estimator averages to it, and the sampler draws x0 with the exact probability.
"""

from __future__ import annotations

import math
from itertools import product

import pytest
import torch
from helpers import BOS, EOS, MASK, tiny_config

from elastic_mdm import ElasticMDMForDiffusionLM
from elastic_mdm.objectives.collators import IGNORE_INDEX, corrupt_packed
from elastic_mdm.objectives.nelbo import ElasticNELBOCollator, elastic_nelbo_terms, gap_nelbo_terms
from elastic_mdm.schedules_elastic_mdm import get_schedule, reveal_probability

A, B = 4, 5  # the interior tokens of the toy x0s


@pytest.fixture(scope="module")
def toy_model() -> ElasticMDMForDiffusionLM:
    """6 ids (PAD, BOS, EOS, MASK, A, B), 10 positions, gap classes 0..4, gap head conditioned on s'; random
    weights (adaLN gates perturbed too, so attention is on), a token head that prefers A and B and a gap head that
    leans to 2, so that short sequences of A and B are likely."""
    config = tiny_config(vocab_size=6, max_position_embeddings=12, max_gap=4, gap_noise_conditioning=True)
    torch.manual_seed(0)  # the initial weights must not depend on which tests ran before
    model = ElasticMDMForDiffusionLM(config).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
        model.lm_head.bias[[A, B]] += 4.0
        model.gap_head.out_proj.bias[2] += 1.5
    return model


def packed_pass(model, inputs: list[list[int]], levels: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token and gap log-probabilities `[T, V]`, `[T, G + 1]` of one pass over `inputs` at noise levels `levels`."""
    lengths = torch.tensor([len(x) for x in inputs])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).int()
    with torch.no_grad():
        out = model(
            torch.tensor([t for x in inputs for t in x]),
            cu_seqlens=cu,
            max_seqlen=int(lengths.max()),
            noise_level=torch.tensor(levels),
        )
    return out.logits.double().log_softmax(-1), out.gap_logits.double().log_softmax(-1)


def trajectory(x0: list[int], steps: tuple[int, ...], num_steps: int) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """For the reveal steps `steps` of x0's interior: per step k the compact input `z_k` and, per adjacent pair,
    `(g, m)`: removed positions between them, and how many of those step k + 1 reveals."""
    states = []
    interior = x0[1:-1]
    for k in range(num_steps + 1):
        tokens, pairs, removed = [BOS], [], []
        for token, step in zip(interior, steps, strict=True):
            if step <= k:
                pairs.append((len(removed), sum(s == k + 1 for s in removed)))
                tokens.append(token if step < k else MASK)
                removed = []
            else:
                removed.append(step)
        pairs.append((len(removed), sum(s == k + 1 for s in removed)))
        states.append((tokens + [EOS], pairs))
    return states


def log_insertion_probability(log_gap: torch.Tensor, m: int, q: float) -> float:
    """`log P_k(m) = log Σ_{g'} p(g') Binomial(m; g', q)`: the sampler's own probability of inserting m masks."""
    total = sum(
        math.exp(float(log_gap[g])) * math.comb(g, m) * q**m * (1 - q) ** (g - m) for g in range(m, log_gap.numel())
    )
    return math.log(total)


def reference(model, x0: list[int], schedule, num_steps: int) -> tuple[float, float, float]:
    """`(-log p_model(x0), ELBO, expected CE sum)` by enumeration of every reveal-step assignment, from the
    sampler's probabilities (`P_k(m)`, token probabilities), not from `elastic_mdm.objectives.nelbo`."""
    table = schedule.table(num_steps).tolist()
    n = len(x0) - 2
    log_p, elbo, ce_sum = [], 0.0, 0.0
    for steps in product(range(1, num_steps + 1), repeat=n):
        log_q = sum(math.log(table[s] - table[s - 1]) for s in steps)
        states = trajectory(x0, steps, num_steps)
        tokens, gaps = packed_pass(model, [z for z, _ in states], table)
        offset, log_model, ce = 0, 0.0, 0.0
        for k, (z, pairs) in enumerate(states):
            masks = [i for i, t in enumerate(z) if t == MASK]
            truth = [x0[1 + j] for j, s in enumerate(steps) if s == k]
            log_model += sum(float(tokens[offset + i, t]) for i, t in zip(masks, truth, strict=True))
            ce -= sum(float(tokens[offset + i, t]) for i, t in zip(masks, truth, strict=True))
            if k < num_steps:
                q = float(reveal_probability(torch.tensor(table[k]), torch.tensor(table[k + 1])))
                for j, (g, m) in enumerate(pairs):
                    log_model += log_insertion_probability(gaps[offset + j], m, q)
                    ce -= float(gaps[offset + j, g])
            offset += len(z)
        log_p.append(log_model)
        elbo += math.exp(log_q) * (log_q - log_model)
        ce_sum += math.exp(log_q) * ce
    return -float(torch.logsumexp(torch.tensor(log_p), 0)), elbo, ce_sum


def estimator_expectation(model, x0: list[int], schedule, num_steps: int) -> float:
    """`E_q[estimator]` of the production code: `elastic_nelbo_terms` on every assignment at every step k, each
    weighted by `q(assignment)` (the weight K and the `1 / K` of `k ~ U{1..K}` cancel; step 0 is taken exactly)."""
    table = schedule.table(num_steps).double()
    n, copies = len(x0) - 2, num_steps + 1
    tokens = torch.tensor(x0 * copies)
    sequence_ids = torch.arange(copies).repeat_interleave(len(x0))
    anchors = torch.zeros(len(x0), dtype=torch.bool)
    anchors[[0, -1]] = True
    k = torch.arange(copies)
    extended = torch.cat([table.new_zeros(1), table, table.new_ones(1)])  # F(-1), F(0..K), F(K+1)
    s, s_active, s_next = extended[k], extended[k + 1], extended[k + 2]
    expectation = 0.0
    for steps in product(range(1, num_steps + 1), repeat=n):
        log_q = sum(math.log(table[j] - table[j - 1]) for j in steps)
        middle = [0.5] + [float(table[j - 1] + table[j]) / 2 for j in steps] + [0.5]  # F(k_i - 1) <= u < F(k_i)
        batch = corrupt_packed(
            tokens, sequence_ids, anchors.repeat(copies), s, s_active, torch.tensor(middle * copies), MASK, s_next
        )
        batch["reveal_prob"] = reveal_probability(s_active, s_next)
        with torch.no_grad():
            token, gap = elastic_nelbo_terms(model, batch)
        expectation += math.exp(log_q) * float((token + gap).sum())
    return expectation


CASES = [([BOS, A, B, EOS], "linear", 3), ([BOS, B, A, A, EOS], "linear", 2), ([BOS, A, A, B, EOS], "exponential", 3)]


@pytest.mark.parametrize(("x0", "schedule", "num_steps"), CASES)
def test_nelbo_is_the_exact_elbo_and_bounds_the_likelihood(toy_model, x0, schedule, num_steps) -> None:
    schedule = get_schedule(schedule)
    nll, elbo, ce_sum = reference(toy_model, x0, schedule, num_steps)
    expected = estimator_expectation(toy_model, x0, schedule, num_steps)
    assert expected == pytest.approx(elbo, rel=1e-6, abs=1e-6)  # the estimator is unbiased for the ELBO
    assert nll <= expected + 1e-9  # and the ELBO bounds -log p(x0)
    assert ce_sum > expected + 0.1  # the CE sum drops log C(g, m) >= 0: it overstates the bound


def test_monte_carlo_estimator_averages_to_the_exact_expectation(toy_model) -> None:
    x0, schedule, num_steps = [BOS, A, B, EOS], get_schedule("linear"), 3
    expected = estimator_expectation(toy_model, x0, schedule, num_steps)
    collator = ElasticNELBOCollator(MASK, BOS, EOS, max_length=12, schedule=schedule, num_steps=num_steps, seed=0)
    estimates = []
    for _ in range(4):
        batch = collator([{"input_ids": x0}] * 2000)
        with torch.no_grad():
            token, gap = elastic_nelbo_terms(toy_model, batch)
        terms = (batch["nelbo_weight"] * (token + gap)).view(2, -1)  # [step 0, step k] of every sequence
        estimates.append(terms.sum(0))
    estimates = torch.cat(estimates)
    standard_error = float(estimates.std()) / math.sqrt(estimates.numel())
    assert abs(float(estimates.mean()) - expected) < 4 * standard_error


def test_sampler_draws_x0_with_the_enumerated_probability(toy_model) -> None:
    x0, schedule, num_steps = [BOS, B, B, EOS], "linear", 3  # about a quarter of the samples
    nll, _, _ = reference(toy_model, x0, get_schedule(schedule), num_steps)
    draws = 4000
    out = toy_model.generate(
        num_return_sequences=draws,
        num_steps=num_steps,
        schedule=schedule,
        seed=0,
        use_cache=False,
        return_dict_in_generate=True,
    )
    sequences, lengths = out.sequences, out.lengths
    hits = sum(list(map(int, seq[:length])) == x0 for seq, length in zip(sequences, lengths, strict=True))
    p = math.exp(-nll)
    assert p > 0.1  # the check has power
    assert abs(hits / draws - p) < 4 * math.sqrt(p * (1 - p) / draws)


def test_gap_term_limits() -> None:
    """`q = 1`: `-log p(g)`; `q = 0`: 0; `m = 0, g = 0`: `-log Σ p(g') (1-q)^g'` (the chance of no insertion)."""
    log_probs = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=torch.float64).log()
    one = gap_nelbo_terms(log_probs, torch.tensor([2]), torch.tensor([2]), torch.tensor([1.0]))
    assert float(one) == pytest.approx(-math.log(0.3))
    zero = gap_nelbo_terms(log_probs, torch.tensor([3]), torch.tensor([0]), torch.tensor([0.0]))
    assert float(zero) == pytest.approx(0.0, abs=1e-6)
    none = gap_nelbo_terms(log_probs, torch.tensor([0]), torch.tensor([0]), torch.tensor([0.5]))
    assert float(none) == pytest.approx(-math.log(0.1 + 0.2 * 0.5 + 0.3 * 0.25 + 0.4 * 0.125))


def test_collator_reveals_match_the_next_step(toy_model) -> None:
    """`gap_reveals` counts the positions of each gap with `F(k) <= u < F(k+1)`; the last token has none."""
    batch = corrupt_packed(
        torch.tensor([BOS, A, B, A, B, EOS]),
        torch.zeros(6, dtype=torch.long),
        torch.tensor([True, False, False, False, False, True]),
        torch.tensor([0.0]),
        torch.tensor([0.25]),
        torch.tensor([0.5, 0.6, 0.1, 0.3, 0.9, 0.5]),
        MASK,
        next_share=torch.tensor([0.7]),
    )
    assert batch["input_ids"].tolist() == [BOS, MASK, EOS]
    assert batch["gap_labels"].tolist() == [1, 2, IGNORE_INDEX]
    assert batch["gap_reveals"].tolist() == [1, 1, IGNORE_INDEX]  # u = 0.6 and u = 0.3 lie in [0.25, 0.7)


def test_nelbo_collator_keeps_each_copy_a_sequence_of_its_own() -> None:
    """Every sequence appears twice (step 0, then step k) with its own boundaries: `cu_seqlens` of the copies are
    the sequence lengths twice over, for one sequence and for several."""
    from elastic_mdm.objectives.nelbo import ElasticNELBOCollator

    collator = ElasticNELBOCollator(3, 1, 2, 64, seed=0, num_steps=4)
    for lengths in ([6], [3, 4, 5]):
        features = [{"input_ids": [1, *range(10, 10 + n - 2), 2]} for n in lengths]
        batch = collator(features)
        assert batch["cu_seqlens"].numel() == 2 * len(lengths) + 1
        assert batch["input_ids"].numel() <= 2 * sum(lengths) and batch["nelbo_weight"].numel() == 2 * len(lengths)
        first = batch["input_ids"][: int(batch["cu_seqlens"][1])]
        assert int(first[0]) == 1 and int(first[-1]) == 2  # step 0: BOS EOS of the first sequence alone

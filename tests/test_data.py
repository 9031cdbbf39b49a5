import pytest
import torch

from elastic_mdm.objectives.collators import IGNORE_INDEX, ElasticMDMCollator, corrupt_packed
from elastic_mdm.schedules_elastic_mdm import NoiseLevelSampler, RevealSchedule

BOS, EOS, MASK = 0, 1, 99


def corrupt(sequences: list[list[int]], s: list[float], s_next: list[float], u: list[list[float]], anchors=None):
    """Forward process with explicit uniforms (anchors get u = 0, ignored)."""
    tokens = torch.tensor([t for seq in sequences for t in seq])
    seq_ids = torch.arange(len(sequences)).repeat_interleave(torch.tensor([len(q) for q in sequences]))
    if anchors is None:
        anchors = [[True] + [False] * (len(q) - 2) + [True] for q in sequences]
    anchor_mask = torch.tensor([a for row in anchors for a in row])
    uniforms = torch.tensor([x for row in u for x in row], dtype=torch.float64)
    return corrupt_packed(
        tokens,
        seq_ids,
        anchor_mask,
        torch.tensor(s, dtype=torch.float64),
        torch.tensor(s_next, dtype=torch.float64),
        uniforms,
        MASK,
    )


def test_hand_computed_example() -> None:
    # x0 = BOS a b c d EOS, u = (.1 .5 .9 .3), (s, s') = (.2, .6): a clean, b mask, c removed, d mask
    out = corrupt([[BOS, 10, 11, 12, 13, EOS]], [0.2], [0.6], [[0, 0.1, 0.5, 0.9, 0.3, 0]])
    assert out["input_ids"].tolist() == [BOS, 10, MASK, MASK, EOS]
    assert out["labels"].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 11, 13, IGNORE_INDEX]
    assert out["gap_labels"].tolist() == [0, 0, 1, 0, IGNORE_INDEX]  # c removed between b and d
    assert out["cu_seqlens"].tolist() == [0, 5] and out["max_seqlen"] == 5
    assert out["noise_level"].tolist() == pytest.approx([0.6])


def test_step_zero_and_step_K() -> None:
    seq = [BOS, 10, 11, 12, 13, 14, EOS]
    u = [[0, 0.05, 0.3, 0.5, 0.7, 0.95, 0]]
    step0 = corrupt([seq], [0.0], [0.0], u)  # only anchors, gap BOS..EOS = n
    assert step0["input_ids"].tolist() == [BOS, EOS]
    assert step0["gap_labels"].tolist() == [5, IGNORE_INDEX]
    assert (step0["labels"] == IGNORE_INDEX).all()
    stepK = corrupt([seq], [0.8], [1.0], u)  # every position active, all gaps 0
    assert stepK["input_ids"].tolist() == [BOS, 10, 11, 12, 13, MASK, EOS]
    assert stepK["gap_labels"].tolist() == [0] * 6 + [IGNORE_INDEX]
    assert stepK["labels"].tolist() == [IGNORE_INDEX] * 5 + [14, IGNORE_INDEX]


def test_empty_interior_and_packing_of_several_sequences() -> None:
    out = corrupt([[BOS, EOS], [BOS, 20, 21, 22, EOS]], [0.0, 0.3], [0.0, 0.6], [[0, 0], [0, 0.7, 0.1, 0.4, 0]])
    assert out["input_ids"].tolist() == [BOS, EOS, BOS, 21, MASK, EOS]
    assert out["gap_labels"].tolist() == [0, IGNORE_INDEX, 1, 0, 0, IGNORE_INDEX]
    assert out["cu_seqlens"].tolist() == [0, 2, 6]


def test_anchors_are_never_noised() -> None:
    seq = [BOS, 10, 11, 12, EOS]
    anchors = [[True, True, False, True, True]]
    out = corrupt([seq], [0.0], [0.0], [[0, 0.9, 0.9, 0.9, 0]], anchors)
    assert out["input_ids"].tolist() == [BOS, 10, 12, EOS]
    assert out["gap_labels"].tolist() == [0, 1, 0, IGNORE_INDEX]


@pytest.mark.parametrize("schedule", [RevealSchedule("linear"), RevealSchedule("exponential")], ids=["lin", "exp"])
def test_state_frequencies_match_schedule(schedule: RevealSchedule) -> None:
    """Clean / mask / removed shares are F(k-1), F(k) - F(k-1), 1 - F(k) (within 5 binomial standard errors)."""
    K, k, n = 8, 6, 20000
    s, s_next = schedule(k - 1, K).item(), schedule(k, K).item()
    seq = [BOS] + torch.randint(2, 90, (n,), generator=torch.Generator().manual_seed(0)).tolist() + [EOS]
    u = torch.rand(n + 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64).tolist()
    out = corrupt([seq], [s], [s_next], [u])
    masks = int((out["input_ids"] == MASK).sum())
    clean = out["input_ids"].numel() - 2 - masks
    removed = n - clean - masks
    for count, p in [(clean, s), (masks, s_next - s), (removed, 1 - s_next)]:
        assert abs(count / n - p) <= 5 * (p * (1 - p) / n) ** 0.5 + 1e-12
    # the gap labels account for every removed position
    assert int(out["gap_labels"][out["gap_labels"] >= 0].sum()) == removed


def test_collator_batch_is_consistent() -> None:
    collator = ElasticMDMCollator(
        MASK, BOS, EOS, max_length=64, noise_sampler=NoiseLevelSampler(min_steps=2, max_steps=4), seed=0
    )
    features = [{"input_ids": [BOS] + list(range(10, 10 + n)) + [EOS]} for n in (0, 3, 17, 40)]
    batch = collator(features)
    lengths = batch["cu_seqlens"].diff()
    assert lengths.numel() == 4 and batch["input_ids"].numel() == int(lengths.sum())
    for i, f in enumerate(features):
        start, end = batch["cu_seqlens"][i].item(), batch["cu_seqlens"][i + 1].item()
        ids, labels, gaps = batch["input_ids"][start:end], batch["labels"][start:end], batch["gap_labels"][start:end]
        assert ids[0] == BOS and ids[-1] == EOS
        # active tokens + removed counts rebuild the original length
        assert int(ids.numel() + gaps[:-1].sum()) == len(f["input_ids"])
        assert bool(((labels != IGNORE_INDEX) == (ids == MASK)).all())


def test_collator_is_reproducible_with_seed() -> None:
    features = [{"input_ids": [BOS, 5, 6, 7, 8, EOS]}] * 3
    a = ElasticMDMCollator(MASK, BOS, EOS, 64, seed=3)(features)
    b = ElasticMDMCollator(MASK, BOS, EOS, 64, seed=3)(features)
    assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels", "gap_labels", "cu_seqlens"))


@pytest.mark.parametrize(
    ("features", "match"),
    [
        ([], "empty"),
        ([{"input_ids": [5, 6, EOS]}], "start with BOS"),
        ([{"input_ids": [BOS, 6, 7]}], "end with EOS"),
        ([{"input_ids": [BOS, MASK, EOS]}], "mask token"),
        ([{"input_ids": [BOS] + [5] * 70 + [EOS]}], "max_length"),
        ([{"input_ids": [BOS]}], "at least BOS and EOS"),
        ([{"input_ids": [BOS, 5, EOS], "anchor_mask": [1, 1]}], "anchor_mask"),
    ],
)
def test_collator_rejects_bad_input(features, match) -> None:
    with pytest.raises(ValueError, match=match):
        ElasticMDMCollator(MASK, BOS, EOS, max_length=64)(features)

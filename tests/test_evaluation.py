import pytest
import torch

from elastic_mdm.evaluation import (
    json_validity,
    ks_statistic,
    length_histogram_table,
    length_report,
    save_length_histogram,
    total_variation,
    wasserstein1,
)


def test_distances_hand_computed() -> None:
    a = torch.tensor([2, 2, 3, 5])  # p = {2: .5, 3: .25, 5: .25}
    b = torch.tensor([2, 3, 3, 3])  # q = {2: .25, 3: .75}
    assert total_variation(a, b) == pytest.approx(0.5 * (0.25 + 0.5 + 0.25))
    # CDFs on 0..5: a = (0, 0, .5, .75, .75, 1), b = (0, 0, .25, 1, 1, 1)
    assert wasserstein1(a, b) == pytest.approx(0.25 + 0.25 + 0.25)
    assert ks_statistic(a, b) == pytest.approx(0.25)
    assert total_variation(a, a) == 0.0 and wasserstein1(a, a) == 0.0 and ks_statistic(a, a) == 0.0


def test_wasserstein_is_the_mean_shift_for_a_translate() -> None:
    a = torch.randint(5, 50, (1000,), generator=torch.Generator().manual_seed(0))
    assert wasserstein1(a + 7, a) == pytest.approx(7.0)
    assert total_variation(a + 100, a) == pytest.approx(1.0)


def test_length_report_and_table(tmp_path) -> None:
    generated, data = torch.tensor([10, 12, 14, 30]), torch.tensor([10, 11, 12, 13, 14])
    report = length_report(generated, data)
    assert report["generated_mean"] == pytest.approx(16.5) and report["data_median"] == 12.0
    table = length_histogram_table(generated, data, num_bins=4)
    assert table.count("\n") >= 2 and "generated" in table
    pytest.importorskip("matplotlib")
    png = save_length_histogram(generated, data, tmp_path / "h.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_empty_lengths_raise() -> None:
    with pytest.raises(ValueError, match="at least one"):
        total_variation(torch.tensor([], dtype=torch.long), torch.tensor([3]))


def test_json_validity() -> None:
    pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    texts = ['{"a":1}', '{"a":"x"}', '{"a":1', "not json"]
    assert json_validity(texts, [schema]) == pytest.approx(0.25)
    assert json_validity([], [schema]) == 0.0

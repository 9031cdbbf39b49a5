"""The charts of `elastic_mdm/evaluation/plots.py`: the trajectory plot and the K-sweep chart."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config

from elastic_mdm import ElasticMDMForDiffusionLM
from elastic_mdm.evaluation.plots import save_sweep_chart, save_trajectory_plot, trajectory_lengths

pytest.importorskip("matplotlib")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

PNG = b"\x89PNG"


def test_trajectory_lengths_and_plot(tmp_path) -> None:
    """Lengths per step grow from the anchors (2 tokens) to each sample's final length, never shrink."""
    torch.manual_seed(0)
    model = ElasticMDMForDiffusionLM(tiny_config()).eval()
    out = model.generate(
        num_return_sequences=3, num_steps=6, seed=0, output_trajectory=True, return_dict_in_generate=True
    )
    lengths = trajectory_lengths(out.trajectory)
    assert len(lengths) == 3 and all(len(row) == 6 + 2 for row in lengths)
    for row, final in zip(lengths, out.lengths.tolist(), strict=True):
        assert row[0] == 2 and row[-1] == final and row == sorted(row)
    path = save_trajectory_plot(out.trajectory, tmp_path / "plots" / "trajectory.png")
    assert path.read_bytes()[:4] == PNG
    with pytest.raises(ValueError, match="output_trajectory=True"):
        trajectory_lengths([])


def test_sweep_chart(tmp_path) -> None:
    rows = [{"schedule": "data (fresh draw)", "K": "-", "mean": 30.0, "data_mean": 30.0, "tv": 0.05}]
    rows += [
        {"schedule": schedule, "K": k, "mean": 30.0 + k / 8, "data_mean": 30.0, "tv": 0.1 + k / 1000}
        for schedule in ("linear", "exponential")
        for k in (1, 4, 16)
    ]
    assert save_sweep_chart(rows, tmp_path / "sweep.png").read_bytes()[:4] == PNG
    with pytest.raises(ValueError, match="length_sweep"):
        save_sweep_chart(rows[:1], tmp_path / "empty.png")

"""The natural-text benchmark (benchmarks/bible_corpus.py, benchmarks/natural_text.py) on a fake `bible` program and
tiny models: the split is by chapter and reproducible, the cost model is its closed form, and a scoring run writes
seeded rows that repeat exactly."""

from __future__ import annotations

import json
import math
import stat
import sys
from pathlib import Path

import pytest
from helpers import tiny_model_for
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from benchmarks import natural_text
from benchmarks.bible_corpus import read_verses, split_chapters, write_corpus
from elastic_mdm.data.synthetic import build_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VERSES = [
    "Ge1:1 In the beginning God created the heaven and the earth.",
    "Ge1:2 And the earth was   without form, and void.",
    "Ge2:1 Thus the heavens and the earth were finished.",
    "1Jo1:1 That which was from the beginning, which we have heard.",
    "1Jo1:2 For the life was manifested, and we have seen it.",
    "Rev22:21 The grace of our Lord Jesus Christ be with you all. Amen.",
]


def fake_bible(tmp_path: Path, lines: list[str]) -> str:
    """A `bible` program that prints `lines` whatever it is asked."""
    (tmp_path / "verses.txt").write_text("\n".join(lines) + "\n")
    program = tmp_path / "bible"
    program.write_text(f"#!/bin/sh\ncat {tmp_path / 'verses.txt'}\n")
    program.chmod(program.stat().st_mode | stat.S_IEXEC)
    return str(program)


def test_verses_are_parsed_by_chapter_with_their_references_dropped(tmp_path: Path) -> None:
    verses = read_verses(fake_bible(tmp_path, VERSES))
    assert [c for c, _ in verses] == ["Ge1", "Ge1", "Ge2", "1Jo1", "1Jo1", "Rev22"]
    assert verses[1][1] == "And the earth was without form, and void."  # whitespace runs folded


def test_an_unexpected_line_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no reference here"):
        read_verses(fake_bible(tmp_path, [*VERSES, "no reference here"]))


def test_a_missing_bible_program_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="apt-get install bible-kjv"):
        read_verses(str(tmp_path / "no-such-program"))


def test_chapters_split_whole_reproducibly_and_in_the_stated_shares() -> None:
    chapters = [f"B{i}" for i in range(200)]
    split = split_chapters(chapters, 0.1, 0.05, seed=3)
    assert split == split_chapters(chapters, 0.1, 0.05, seed=3) != split_chapters(chapters, 0.1, 0.05, seed=4)
    counts = {name: sum(v == name for v in split.values()) for name in ("train", "validation", "test")}
    assert counts == {"train": 170, "validation": 20, "test": 10}


def test_every_chapter_lands_whole_in_one_split_in_both_forms(tmp_path: Path) -> None:
    verses = read_verses(fake_bible(tmp_path, VERSES))
    split_of = {"Ge1": "train", "Ge2": "test", "1Jo1": "validation", "Rev22": "train"}
    counts = write_corpus(tmp_path / "out", verses, split_of)
    assert counts["train"] == {"chapters": 2, "verses": 3}
    read = {(form, s): (tmp_path / "out" / form / f"{s}.txt").read_text().splitlines()
            for form in ("verses", "chapters") for s in ("train", "validation", "test")}  # fmt: skip
    assert read["verses", "validation"] == [verses[3][1], verses[4][1]]
    assert read["chapters", "validation"] == [f"{verses[3][1]} {verses[4][1]}"]
    assert read["chapters", "train"][0] == f"{verses[0][1]} {verses[1][1]}"


@pytest.mark.parametrize("num_steps", [1, 7, 128])
def test_linear_cost_model_is_its_closed_form(num_steps: int) -> None:
    """`Σ_{k=1..K} (k/K)^2 = (K + 1)(2K + 1) / 6K`; MDLM pays `K` full canvases."""
    cost = natural_text.cost_model("linear", num_steps)
    expected = (num_steps + 1) * (2 * num_steps + 1) / (6 * num_steps)
    assert math.isclose(cost["elastic_cost"], expected, abs_tol=1e-3) and cost["mdlm_cost"] == num_steps


def test_exponential_is_the_cheapest_schedule_of_the_cost_model() -> None:
    costs = [natural_text.cost_model(s, 128, **p)["elastic_cost"] for s, p in natural_text.FIG4_SCHEDULES.items()]
    assert costs[0] > costs[1] > costs[2] > 0  # linear > p-linear (p = 2) > exponential


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A tokenizer, a random Elastic-MDM and a random GPT-2 scorer on it, and a test split, in one folder."""
    root = tmp_path_factory.mktemp("natural")
    lines = [v.split(" ", 1)[1] for v in VERSES]
    tokenizer = build_tokenizer(texts=lines * 4, vocab_size=300)
    tiny_model_for(tokenizer).save_pretrained(root / "elastic")
    tokenizer.save_pretrained(root / "elastic")
    scorer = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=64,
            n_embd=32,
            n_layer=1,
            n_head=2,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    scorer.save_pretrained(root / "scorer")
    tokenizer.save_pretrained(root / "scorer")
    (root / "test.txt").write_text("\n".join(lines) + "\n")
    return root


def run(tiny_run: Path, monkeypatch, command: str, output: str, *flags: str) -> list[dict]:
    out = tiny_run / output
    out.unlink(missing_ok=True)
    argv = ["natural_text", command, str(tiny_run / "elastic"), "--output", str(out), "--scorer",
            str(tiny_run / "scorer"), "--test_file", str(tiny_run / "test.txt"), "--num_samples", "8", "--repeats", "1",
            "--nelbo_draws", "1", "--nelbo_steps", "8", *flags]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    natural_text.main()
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_steps_rows_are_seeded_and_complete(tiny_run: Path, monkeypatch) -> None:
    first = run(tiny_run, monkeypatch, "steps", "a.jsonl", "--steps", "2", "4")
    again = run(tiny_run, monkeypatch, "steps", "b.jsonl", "--steps", "2", "4")
    tokenizer = AutoTokenizer.from_pretrained(tiny_run / "elastic")
    test_lengths = [len(ids) for ids in tokenizer((tiny_run / "test.txt").read_text().splitlines())["input_ids"]]
    assert first[0]["sampler"] == "data" and first[0]["mean_length"] == round(sum(test_lengths) / len(test_lengths), 2)
    rows = first[1:]
    assert [(r["sampler"], r["K"]) for r in rows] == [(s, k) for s in natural_text.ELASTIC_SAMPLERS for k in (2, 4)]
    timing = ("ms_b1", "ms_b16")
    for row, repeat in zip(rows, again[1:], strict=True):
        assert all(row[t] > 0 for t in timing) and 0 < row["gen_ppl"] < math.inf and 0 <= row["ks"] <= 1
        assert 2 <= row["mean_length"] <= 48 and row["entropy"] <= math.log(48)
        assert {k: v for k, v in row.items() if k not in timing} == {k: v for k, v in repeat.items() if k not in timing}


def test_schedules_rows_cover_every_schedule_and_sampler(tiny_run: Path, monkeypatch) -> None:
    rows = run(tiny_run, monkeypatch, "schedules", "c.jsonl", "--steps", "4")
    pairs = [(r["schedule"], r["sampler"]) for r in rows]
    samplers = [*natural_text.ELASTIC_SAMPLERS, *natural_text.MDLM_SAMPLERS]
    assert pairs == [(s, name) for s in natural_text.FIG4_SCHEDULES for name in samplers]
    assert all(0 < r["passes"] <= 4 + 1 and r["ms_per_sequence"] > 0 for r in rows)  # steps 0..K at most
    assert next(r["passes"] for r in rows if r["sampler"] == "mdlm") == 4  # linear: every step of 48 masks reveals


def test_a_test_line_longer_than_the_model_is_refused(tmp_path: Path) -> None:
    tokenizer = build_tokenizer(texts=["a b c"] * 4, vocab_size=270)
    (tmp_path / "t.txt").write_text("a b c a b c a b c\n")
    with pytest.raises(ValueError, match="more than the model's 4"):
        natural_text.test_split(tokenizer, tmp_path / "t.txt", 4)


def test_the_chart_draws_one_line_per_model_and_sampler(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("matplotlib")
    rows = [{"checkpoint": "test split", "sampler": "data", "gen_ppl": 60.0}]
    rows += [{"checkpoint": f"out/{model}", "sampler": "paper", "K": k, "gen_ppl": 100.0 / k + i, "ms_b1": k,
              "ms_b16": k / 4} for i, model in enumerate(("a", "b")) for k in (8, 16)]  # fmt: skip
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plotted = []
    monkeypatch.setattr("matplotlib.axes.Axes.plot", lambda self, x, y, **kw: plotted.append((kw["label"], x, y)))
    argv = ["natural_text", "chart", str(tmp_path / "rows.jsonl"), "--output", str(tmp_path / "chart.png")]
    monkeypatch.setattr(sys, "argv", argv)
    natural_text.main()
    assert (tmp_path / "chart.png").stat().st_size > 0
    assert plotted[:2] == [("a paper", [8, 16], [12.5, 6.25]), ("b paper", [8, 16], [13.5, 7.25])]

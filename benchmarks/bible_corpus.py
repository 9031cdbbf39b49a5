"""The natural-text corpus of docs/quality.md "Natural text": the King James Bible (public domain, Debian's
`bible-kjv`), split by chapter into train / validation / test, in two forms, and a BPE trained on the train split.

    apt-get install bible-kjv      # the `bible` program and its text
    python -m benchmarks.bible_corpus outputs/kjv

* `verses/{train,validation,test}.txt`: one verse per line, a sentence-level corpus like LM1B (L = 128);
* `chapters/{train,validation,test}.txt`: one chapter per line (its verses joined by spaces), the long documents of
  the L = 1024 runs, chunked by `scripts/train.py` as any long document;
* `tokenizer/`: a byte-level BPE (`elastic_mdm.data.synthetic.build_tokenizer`, `--vocab_size`) on the train verses.

A chapter goes whole to one split (seeded draw of `--validation_share` and `--test_share` of the 1,189 chapters), so
no verse of a held-out chapter is seen in training. Verse references (`Ge1:1`) are dropped: only the text is kept.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
from collections import defaultdict
from pathlib import Path

from elastic_mdm.data.synthetic import build_tokenizer

WHOLE_BIBLE = "Gen1:1-Rev22:21"
REFERENCE = re.compile(r"^(?P<book>\d?[A-Za-z]+)(?P<chapter>\d+):(?P<verse>\d+) (?P<text>.*)$")
SPLITS = ("train", "validation", "test")


def read_verses(bible: str = "bible") -> list[tuple[str, str]]:
    """`[(chapter id, verse text)]` of the whole Bible, in order, from the `bible` program of `bible-kjv`."""
    try:
        out = subprocess.run([bible, "-f", WHOLE_BIBLE], capture_output=True, text=True, check=True).stdout
    except FileNotFoundError as err:
        raise SystemExit(f"`{bible}` was not found: install Debian's bible-kjv (apt-get install bible-kjv).") from err
    verses = []
    for line in out.splitlines():
        match = REFERENCE.match(line.strip())
        if match is None:
            raise ValueError(f"Unexpected line from `{bible} -f {WHOLE_BIBLE}`: {line!r}")
        verses.append((f"{match['book']}{match['chapter']}", " ".join(match["text"].split())))
    return verses


def split_chapters(chapters: list[str], validation_share: float, test_share: float, seed: int) -> dict[str, str]:
    """Chapter id -> split: a seeded shuffle, the first `test_share` to test, the next `validation_share` to
    validation, the rest to train."""
    order = chapters[:]
    random.Random(seed).shuffle(order)
    num_test, num_validation = round(test_share * len(order)), round(validation_share * len(order))
    return {
        chapter: "test" if i < num_test else "validation" if i < num_test + num_validation else "train"
        for i, chapter in enumerate(order)
    }


def write_corpus(out: Path, verses: list[tuple[str, str]], split_of: dict[str, str]) -> dict[str, dict[str, int]]:
    """Write `verses/` and `chapters/` (see the module docstring); returns the counts per split."""
    by_chapter: dict[str, list[str]] = defaultdict(list)
    for chapter, text in verses:
        by_chapter[chapter].append(text)
    counts = {}
    for split in SPLITS:
        chapters = [c for c in by_chapter if split_of[c] == split]  # in canonical order
        lines = {
            "verses": [v for c in chapters for v in by_chapter[c]],
            "chapters": [" ".join(by_chapter[c]) for c in chapters],
        }
        for form, rows in lines.items():
            (out / form).mkdir(parents=True, exist_ok=True)
            (out / form / f"{split}.txt").write_text("\n".join(rows) + "\n")
        counts[split] = {"chapters": len(chapters), "verses": len(lines["verses"])}
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir")
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--validation_share", type=float, default=0.05)
    parser.add_argument("--test_share", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bible", default="bible", help="The bible-kjv program.")
    args = parser.parse_args()
    out = Path(args.output_dir)
    verses = read_verses(args.bible)
    split_of = split_chapters(sorted({c for c, _ in verses}), args.validation_share, args.test_share, args.seed)
    counts = write_corpus(out, verses, split_of)
    train = (out / "verses" / "train.txt").read_text().splitlines()
    tokenizer = build_tokenizer(texts=train, vocab_size=args.vocab_size)
    tokenizer.model_max_length = 1024
    tokenizer.save_pretrained(out / "tokenizer")
    lengths = sorted(len(ids) for ids in tokenizer(train)["input_ids"])
    summary = {"splits": counts, "vocab_size": len(tokenizer), "train_verse_tokens": {
        "mean": round(sum(lengths) / len(lengths), 1), "median": lengths[len(lengths) // 2], "max": lengths[-1],
        "over_128": sum(n > 128 for n in lengths)}}  # fmt: skip
    (out / "corpus.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

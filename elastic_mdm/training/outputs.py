"""Training outputs: a run never overwrites a model or a checkpoint unasked, and a resumed run is exact or refused.

* `check_output_dir`: an `--output_dir` holding a model or `checkpoint-*` folders (or equal to the run's source) is
  refused unless `--overwrite_output_dir` is given or the run resumes from a checkpoint inside it;
* `check_resume_checkpoint`: a resume needs the optimizer, scheduler, RNG and trainer state of a Trainer checkpoint;
* `check_resume_config`: the model the flags build must be the checkpoint's.

See docs/security.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..loading.checkpoints import checkpoint_config, model_artefacts

OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")
SCHEDULER_FILES = ("scheduler.pt",)


def holds_model(folder: Path) -> list[str]:
    """What in `folder` a training run would overwrite or delete: any model artefact (config, full or sharded
    weights, a LoRA adapter, DeepSpeed states: `loading.checkpoints.MODEL_ARTEFACTS`) and `checkpoint-*` folders."""
    if not folder.is_dir():
        return []
    found = model_artefacts(folder)
    found += sorted(p.name for p in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir())
    return found


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_dir(
    output_dir: str,
    overwrite_output_dir: bool = False,
    resume_from_checkpoint: str | None = None,
    sources: Iterable[str | None] = (),
) -> None:
    """Refuse a training `output_dir` that would overwrite or delete a model.

    * `output_dir` equal to a source (`--model_name_or_path`, `--tokenizer_name`) is always refused: the run would
      overwrite the weights it starts from;
    * an `output_dir` holding model files or `checkpoint-*` folders is refused unless `overwrite_output_dir` is set or
      the run resumes from a checkpoint inside it.
    """
    out = Path(output_dir).expanduser().resolve()
    for source in sources:
        if source and Path(source).expanduser().exists() and Path(source).expanduser().resolve() == out:
            raise ValueError(
                f"--output_dir {output_dir!r} is the folder the run starts from ({source!r}); saving there would "
                "overwrite the source checkpoint. Choose another --output_dir."
            )
    found = holds_model(out)
    if not found or overwrite_output_dir:
        return
    if resume_from_checkpoint and _inside(Path(resume_from_checkpoint).expanduser().resolve(), out):
        return
    last = get_last_checkpoint(str(out))
    resume = f" To continue that run, pass --resume_from_checkpoint {last}." if last else ""
    raise ValueError(
        f"--output_dir {output_dir!r} already holds a model ({', '.join(found[:5])}); training there would overwrite "
        f"it (and --save_total_limit could delete its checkpoints). Choose another --output_dir, or pass "
        f"--overwrite_output_dir to replace it.{resume}"
    )


def missing_resume_state(checkpoint: Path) -> list[str]:
    """The parts of a Trainer checkpoint an exact resume needs but `checkpoint` lacks: optimizer, scheduler, RNG and
    trainer state. A DeepSpeed checkpoint keeps its optimizer in `global_step*/`."""
    missing = []
    if not any((checkpoint / f).exists() for f in OPTIMIZER_FILES) and not list(checkpoint.glob("global_step*")):
        missing.append("optimizer state (optimizer.pt)")
    if not any((checkpoint / f).exists() for f in SCHEDULER_FILES):
        missing.append("learning-rate scheduler state (scheduler.pt)")
    if not list(checkpoint.glob("rng_state*.pth")):
        missing.append("RNG state (rng_state*.pth)")
    if not (checkpoint / "trainer_state.json").exists():
        missing.append("trainer state (trainer_state.json)")
    return missing


def check_resume_checkpoint(checkpoint: str) -> None:
    """Refuse to resume from a folder that is not a complete Trainer checkpoint (the resume would not be exact)."""
    path = Path(checkpoint).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint: no such checkpoint folder: {checkpoint!r}.")
    missing = missing_resume_state(path)
    if missing:
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint!r} lacks its {', '.join(missing)}, so the run would not continue "
            "exactly (the optimizer, learning rate and noise would restart). Resume from a complete checkpoint-* "
            "folder, or start a new run from these weights with --model_name_or_path."
        )


def check_resume_config(checkpoint: str, expected: dict[str, Any]) -> None:
    """Refuse to resume when the model the flags build differs from the checkpoint's `config.json` in one of the
    `expected` fields (the run would train another model and save its config over the checkpoint's). A checkpoint
    without `config.json` (LoRA adapters only) is not compared."""
    path = Path(checkpoint).expanduser().resolve()
    if not (path / "config.json").exists():
        return
    saved = checkpoint_config(str(path))
    changed = [
        f"{name}: {saved[name]!r} in the checkpoint, {value!r} from the flags"
        for name, value in expected.items()
        if name in saved and saved[name] != value
    ]
    if changed:
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint!r} was trained with another model ({'; '.join(changed)}). Resume "
            "with the flags the run was started with, or start a new run from these weights with "
            "--model_name_or_path."
        )


__all__ = [
    "holds_model",
    "check_output_dir",
    "missing_resume_state",
    "check_resume_checkpoint",
    "check_resume_config",
]

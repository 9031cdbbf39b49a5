"""Reading a source checkpoint: a local folder or a Hub id, indexed from the file headers, then read one file and one
tensor at a time (`.safetensors`, sharded or not, or torch `.bin` state dicts, memory-mapped)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers.modeling_utils import str_to_torch_dtype

CONFIG_NAME = "config.json"
SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_WEIGHTS, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)


@dataclass(frozen=True)
class TensorInfo:
    """A source tensor as its file header describes it (no data read)."""

    file: str
    shape: tuple[int, ...]
    dtype: torch.dtype


class _SafetensorsFile:
    """An open `.safetensors` file: names and shapes from the header, one tensor loaded on request."""

    def __init__(self, handle):
        self.handle = handle

    def keys(self) -> list[str]:
        return list(self.handle.keys())

    def info(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        view = self.handle.get_slice(key)
        return tuple(view.get_shape()), str_to_torch_dtype[view.get_dtype()]  # safetensors dtype names (Transformers)

    def load(self, key: str) -> torch.Tensor:
        return self.handle.get_tensor(key)


class _TorchFile:
    """A `pytorch_model.bin` state dict, memory-mapped (data is read only when a tensor is used)."""

    def __init__(self, path: Path):
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # legacy (non-zip) format: cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(
                f"{path} is not a flat state dict of tensors (a training checkpoint?); export the weights."
            )
        self.state = state

    def keys(self) -> list[str]:
        return list(self.state)

    def info(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        return tuple(self.state[key].shape), self.state[key].dtype

    def load(self, key: str) -> torch.Tensor:
        return self.state[key]


@contextmanager
def open_weight_file(path: Path) -> Iterator[_SafetensorsFile | _TorchFile]:
    """Open one weight file (`.safetensors` or a torch `.bin`) lazily; it is closed when the block ends."""
    if path.name.endswith(".safetensors"):
        with safe_open(path, framework="pt", device="cpu") as handle:
            yield _SafetensorsFile(handle)
    else:
        yield _TorchFile(path)


def read_json(path: Path) -> dict:
    """The JSON file `path`; a clear FileNotFoundError when the checkpoint folder lacks it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: a checkpoint folder needs its {path.name}.")
    with open(path) as f:
        return json.load(f)


def find_weight_files(folder: Path) -> tuple[list[str], dict[str, str] | None]:
    """The weight files of `folder` in load order and the index's `weight_map` (None for a single file).

    Looked for, in order: `model.safetensors.index.json` (shards), `model.safetensors`,
    `pytorch_model.bin.index.json`, `pytorch_model.bin`. A shard the index names but the folder lacks is an error.
    """
    for index_name, single_name in ((SAFE_INDEX, SAFE_WEIGHTS), (BIN_INDEX, BIN_WEIGHTS)):
        if (folder / index_name).is_file():
            weight_map = read_json(folder / index_name).get("weight_map") or {}
            files = list(dict.fromkeys(weight_map.values()))
            missing = [name for name in files if not (folder / name).is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{index_name} in {folder} lists shard(s) {missing} that are not in the folder (an interrupted "
                    "download?): fetch the missing shard(s) again."
                )
            return files, weight_map
        if (folder / single_name).is_file():
            return [single_name], None
    raise FileNotFoundError(
        f"No weights in {folder}: expected {SAFE_WEIGHTS}, {SAFE_INDEX} with its shards, {BIN_WEIGHTS} or {BIN_INDEX}."
    )


class SourceCheckpoint:
    """An original checkpoint folder: its `config.json` and every tensor's file, shape and dtype (headers only)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.config = read_json(folder / CONFIG_NAME)
        files, weight_map = find_weight_files(folder)
        self.tensors: dict[str, TensorInfo] = {}
        for name in files:
            with open_weight_file(folder / name) as weights:
                for key in weights.keys():
                    if key in self.tensors:
                        raise ValueError(f"{key} is stored twice, in {self.tensors[key].file} and in {name}.")
                    self.tensors[key] = TensorInfo(name, *weights.info(key))
        absent = [f"{key} (in {file})" for key, file in (weight_map or {}).items() if key not in self.tensors]
        if absent:
            raise ValueError(f"The weight index lists tensors that its shards do not hold: {absent[:10]}.")

    def stream(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor once, in `self.tensors` order: one file open at a time, one tensor loaded at a time."""
        for name in dict.fromkeys(info.file for info in self.tensors.values()):
            with open_weight_file(self.folder / name) as weights:
                for key in (k for k, info in self.tensors.items() if info.file == name):
                    yield key, weights.load(key)

    def load(self, key: str) -> torch.Tensor:
        """One tensor, copied out of its file."""
        with open_weight_file(self.folder / self.tensors[key].file) as weights:
            return weights.load(key).clone()


def resolve_source(src: str | Path, revision: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """A local folder as is; otherwise a Hub repo id, downloaded (config, weights, index and tokenizer files only;
    safetensors preferred, `.bin` only when the repo has no safetensors)."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{src} is a file; pass the checkpoint folder (config.json + weights) or a Hub repo id.")
    from huggingface_hub import snapshot_download

    common = [CONFIG_NAME, *TOKENIZER_FILES]
    try:
        for weights in (["*.safetensors", SAFE_INDEX], ["pytorch_model*.bin", BIN_INDEX]):
            folder = Path(
                snapshot_download(str(src), revision=revision, cache_dir=cache_dir, allow_patterns=common + weights)
            )
            if any(folder.glob(weights[0])):
                return folder
    except Exception as error:  # offline, unknown repo, gated, ...: one clear message
        raise FileNotFoundError(
            f"{src} is neither a local folder nor a Hub repo that could be downloaded "
            f"({type(error).__name__}: {error})."
        ) from error
    return folder

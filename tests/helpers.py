"""Shared by the test modules: the special ids and the tiny config the model and sampler tests build on."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from elastic_mdm import ElasticMDMConfig, ElasticMDMForDiffusionLM
from elastic_mdm.schedules_elastic_mdm import RevealSchedule, get_schedule

PAD, BOS, EOS, MASK = 0, 1, 2, 3
VOCAB, MAX_POS = 64, 64
# Flags that make a run of configs/tiny.yaml take seconds (the training command's tests, the session's `trained_tiny`).
QUICK = [
    "--max_steps", "3", "--num_synthetic_records", "300", "--num_synthetic_eval_records", "32",
    "--hidden_size", "32", "--num_hidden_layers", "1", "--num_attention_heads", "2",
    "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--logging_steps", "1",
]  # fmt: skip


def tiny_config(**overrides) -> ElasticMDMConfig:
    """2 layers x 32 hidden x 4 heads, 64 positions, special ids PAD/BOS/EOS/MASK = 0/1/2/3; `overrides` win."""
    params = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_POS,
        cond_dim=16,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        mask_token_id=MASK,
    )
    params.update(overrides)
    return ElasticMDMConfig(**params)


def tiny_model_for(tokenizer):
    """A random (seed 0) `ElasticMDMForDiffusionLM` in eval mode on `tokenizer`'s vocabulary and special ids:
    1 layer x 32 hidden x 4 heads, 48 positions (the pipeline and lm-eval tests, on the synthetic tokenizer)."""
    import torch

    from elastic_mdm import ElasticMDMForDiffusionLM

    torch.manual_seed(0)
    config = ElasticMDMConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=48, mask_token_id=tokenizer.mask_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return ElasticMDMForDiffusionLM(config).eval()


def patch_host_read(monkeypatch, replacement) -> None:
    """Replace `host_read` in every `elastic_mdm` module that imported it (the samplers' one device read per step)."""
    from elastic_mdm.device_reads_elastic_mdm import host_read

    for module in list(sys.modules.values()):
        if (
            getattr(module, "__name__", "").startswith("elastic_mdm")
            and getattr(module, "host_read", None) is host_read
        ):
            monkeypatch.setattr(module, "host_read", replacement)


class HostSyncRecorder:
    """Records the ops that read a device tensor back to the host (a stream sync on CUDA), seen on CPU through a
    `TorchDispatchMode`: `nonzero`, `.item()` / `int(t)` / `bool(t)`, boolean indexing, `masked_select`,
    `repeat_interleave` without `output_size`, `multinomial` (its validity check reads back). The sampler's own
    reads go through `host_read` (patched in every module that imports it), counted apart in `reads`. With
    `loop_only`, only what runs inside the samplers' step loops (`step_range`) is recorded."""

    def __init__(self, monkeypatch, loop_only: bool = False) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        import elastic_mdm.sampler_loop_elastic_mdm as generation

        recorder = self
        self.syncs: list[str] = []
        self.reads = 0
        self._in_read = False
        plain_read = generation.host_read

        def counted_read(*values):
            recorder.reads += 1
            recorder._in_read = True
            try:
                return plain_read(*values)
            finally:
                recorder._in_read = False

        patch_host_read(monkeypatch, counted_read)
        self.recording = not loop_only
        plain_range = generation.step_range

        def recorded_range(*args):
            recorder.recording = True
            yield from plain_range(*args)
            recorder.recording = not loop_only

        monkeypatch.setattr(generation, "step_range", recorded_range)

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if recorder.recording and not recorder._in_read and recorder.reads_back(func, args, kwargs):
                    recorder.syncs.append(str(func))
                return func(*args, **kwargs)

        self.mode = Mode()

    @staticmethod
    def reads_back(func, args, kwargs) -> bool:
        import torch

        name = func.overloadpacket.__name__
        if name in ("nonzero", "_local_scalar_dense", "item", "masked_select", "multinomial"):
            return True
        if name == "repeat_interleave":
            return kwargs.get("output_size") is None
        if name in ("index", "index_put", "index_put_"):
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
        return False

    def __enter__(self) -> HostSyncRecorder:
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)


# Shared by the oracle tests of the two samplers (tests/test_sampler_oracle.py, tests/test_generation_mdlm.py).

SCHEDULE_PARAMS: dict[str, dict[str, float]] = {"clipped": dict(beta=0.2, omega=0.8)}


def schedule_of(name: str) -> RevealSchedule:
    """The reveal schedule `name`, with the parameters of `SCHEDULE_PARAMS`."""
    return get_schedule(name, **SCHEDULE_PARAMS.get(name, {}))


def sequences_of(output) -> list[list[int]]:
    """The sampled sequences of a generate output, each cut to its length."""
    return [row[:length].tolist() for row, length in zip(output.sequences, output.lengths.tolist(), strict=True)]


class TrueTokenHead:
    """The token head of the oracle denoisers: all mass on the true token, held in feature 0 of `hidden` `[rows, F]`
    (`vocab_size` logits)."""

    vocab_size: int

    def token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.full((hidden.shape[0], self.vocab_size), float("-inf"))
        logits[torch.arange(hidden.shape[0]), hidden[:, 0].long()] = 0.0
        return logits


def cached_and_fresh(model, inputs, **kwargs):
    """`model.generate(inputs, **kwargs)` with and without the step cache; checks they give the same samples."""
    cached = model.generate(inputs, use_cache=True, **kwargs)
    fresh = model.generate(inputs, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, fresh.sequences) and torch.equal(cached.lengths, fresh.lengths)
    return cached, fresh


SPECIALS = ["<pad>", "<bos>", "<eos>", "<mask>"]  # ids PAD, BOS, EOS, MASK of `tiny_config`


def word_tokenizer(words: list[str] | None = None):
    """A 64-token word-level tokenizer whose special ids are PAD/BOS/EOS/MASK = 0/1/2/3 (those of `tiny_config`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = words or [f"w{i}" for i in range(VOCAB - len(SPECIALS))]
    vocab = {token: i for i, token in enumerate(SPECIALS + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=words[0]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", mask_token="<mask>",
        unk_token=words[0],
    )  # fmt: skip
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (PAD, BOS, EOS)
    assert tokenizer.mask_token_id == MASK and len(tokenizer) == VOCAB
    return tokenizer


def save_checkpoint(folder: Path, **overrides) -> Path:
    """A tiny Elastic-MDM folder (weights, config, remote code, tokenizer)."""
    torch.manual_seed(0)
    ElasticMDMForDiffusionLM(tiny_config(**overrides)).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


# Tiny random models for the generate() tests (tests/test_generation.py, tests/test_streaming.py).

ANCHORS = (5, 6, 7, 8)  # ids the tame model never generates, so anchors can be found in the output


@torch.no_grad()
def random_model(tame: bool = True, seed: int = 0, **overrides) -> ElasticMDMForDiffusionLM:
    """Tiny random model. `tame`: gap logits biased towards small counts (a geometric-like prior, so lengths vary
    instead of always hitting the cap) and the special / anchor ids never generated as tokens."""
    torch.manual_seed(seed)
    model = ElasticMDMForDiffusionLM(tiny_config(**overrides)).eval()
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    if tame:
        classes = torch.arange(model.config.num_gap_classes, dtype=torch.float32)
        model.gap_head.out_proj.bias.copy_(-1.0 * classes)
        model.gap_head.out_proj.weight.mul_(0.1)
        banned = [PAD, BOS, EOS, *ANCHORS]
        if model.lm_head.bias is None:
            model.lm_head.bias = torch.nn.Parameter(torch.zeros(VOCAB))
        model.lm_head.bias[banned] = -1e4
    return model

"""Tests of the Elastic-MDM backbone and heads (docs/design.md §2, §4, §6).

Tiny models (vocab 64, hidden 32, 2 layers, 4 heads, 64 positions) of every block flavour, with all weights
perturbed away from their (partly zero) initialisation so that adaLN, attention and both heads really act.
"""

from __future__ import annotations

import json
import os
import textwrap
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from helpers import BOS, EOS, MASK, MAX_POS, PAD, VOCAB, tiny_config

from elastic_mdm import ElasticMDMConfig, ElasticMDMForDiffusionLM
from elastic_mdm.generation_config_elastic_mdm import ElasticMDMGenerationConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]

VARIANTS: dict[str, dict] = {
    "dit": dict(block_type="dit"),
    "dit-time-sum": dict(block_type="dit", time_conditioning=True, gap_head_type="sum"),
    "llama": dict(block_type="llama", adaln=False),
    "llama-adaln-product": dict(block_type="llama", adaln=True, gap_head_type="product"),
    "llama-adaln-time": dict(block_type="llama", adaln=True, time_conditioning=True),
}


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Add N(0, std²) noise to every parameter (zero-initialised adaLN and biases included), deterministically."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.add_(torch.randn(param.shape, generator=generator, dtype=torch.float32).to(param.dtype) * std)
    return model


def tiny_model(variant: str = "dit", seed: int = 0, attn_implementation: str | None = None, **overrides):
    config = tiny_config(**{**VARIANTS[variant], **overrides})
    torch.manual_seed(seed)
    if attn_implementation is None:
        model = ElasticMDMForDiffusionLM(config)
    else:
        model = ElasticMDMForDiffusionLM._from_config(config, attn_implementation=attn_implementation)
    return perturb_(model, seed).eval()


# Three sequences with masks inside, and an anchors-only one; noise levels s' per sequence.
SEQUENCES = [
    [BOS, 5, MASK, 7, MASK, EOS],
    [BOS, 9, 10, 11, 12, MASK, MASK, 13, 14, EOS],
    [BOS, EOS],
    [BOS, MASK, 20, 21, EOS],
]
NOISE = [0.3, 0.7, 0.0, 0.55]


def packed_batch(order: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seqs = [SEQUENCES[i] for i in order]
    ids = torch.tensor([t for s in seqs for t in s])
    cu = torch.tensor([0] + [len(s) for s in seqs]).cumsum(0).to(torch.int32)
    return ids, cu, torch.tensor([NOISE[i] for i in order])


def run_packed(model, order: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sequence (in `order`): logits [L, V] and gap logits [L - 1, G] (the last token has no right neighbour)."""
    ids, cu, noise = packed_batch(order)
    with torch.no_grad():
        out = model(ids, cu_seqlens=cu, noise_level=noise)
    assert out.logits.shape == (ids.numel(), VOCAB)
    assert out.gap_logits.shape == (ids.numel(), model.config.max_gap + 1)
    bounds = cu.tolist()
    return [(out.logits[a:b], out.gap_logits[a : b - 1]) for a, b in pairwise(bounds)]


# ---------------------------------------------------------------------------------------------------------------
# Packing, padding, attention backends
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packing_invariance(variant: str) -> None:
    """A sequence's logits and gap logits do not depend on what else is in its pack, nor on the pack order."""
    model = tiny_model(variant)
    packed = run_packed(model, [0, 1, 2, 3])
    reordered = run_packed(model, [3, 1, 0, 2])
    position_in_reordered = {3: 0, 1: 1, 0: 2, 2: 3}
    for i in range(len(SEQUENCES)):
        (alone_logits, alone_gap) = run_packed(model, [i])[0]
        for logits, gap in (packed[i], reordered[position_in_reordered[i]]):
            # fp32 round-off only: a batch of one and of four rows take different matmul kernels (adaLN, heads)
            torch.testing.assert_close(logits, alone_logits, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(gap, alone_gap, atol=1e-4, rtol=1e-4)
        assert torch.isfinite(alone_gap).all()


def test_diffusion_lm_runs_the_backbone_through_its_module_call() -> None:
    """`ElasticMDMForDiffusionLM.forward` calls `self.model(...)` once (hooks fire, as for any Transformers head),
    and its token logits are the token head of the backbone's packed features: no second pass."""
    model = tiny_model("dit-time-sum")
    ids, cu, noise = packed_batch([0, 1, 2])
    calls = []
    handle = model.model.register_forward_hook(lambda module, args, kwargs, out: calls.append(out), with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(ids, cu_seqlens=cu, noise_level=noise)
    finally:
        handle.remove()
    assert len(calls) == 1
    features = calls[0]
    assert features.last_hidden_state.shape == (ids.numel(), model.config.hidden_size)
    assert features.packed.batch_size == 3 and features.flat_index is None
    torch.testing.assert_close(out.logits, model.token_logits(features.last_hidden_state), atol=0, rtol=0)
    with torch.no_grad():  # the base model alone: the same features, in the layout of its input
        alone = model.model(ids, cu_seqlens=cu, noise_level=noise)
    torch.testing.assert_close(alone.last_hidden_state, features.last_hidden_state, atol=0, rtol=0)


@pytest.mark.parametrize("variant", ["dit-time-sum", "llama-adaln-time"])
def test_time_conditioning_changes_outputs(variant: str) -> None:
    """With time conditioning on, the noise level reaches the backbone; with it off it is ignored."""
    model = tiny_model(variant)
    ids, cu, _ = packed_batch([0])
    with torch.no_grad():
        a = model(ids, cu_seqlens=cu, noise_level=torch.tensor([0.1])).logits
        b = model(ids, cu_seqlens=cu, noise_level=torch.tensor([0.9])).logits
    assert not torch.allclose(a, b)
    plain = tiny_model(variant, time_conditioning=False)
    with torch.no_grad():
        a = plain(ids, cu_seqlens=cu, noise_level=torch.tensor([0.1])).logits
        b = plain(ids, cu_seqlens=cu, noise_level=torch.tensor([0.9])).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_padded_input_matches_packed(variant: str) -> None:
    """`[B, L]` + attention_mask (right and left padding, junk ids at padding) equals the packed run."""
    model = tiny_model(variant)
    order = [0, 1, 2, 3]
    packed = run_packed(model, order)
    length = max(len(s) for s in SEQUENCES)
    input_ids = torch.full((len(order), length), MASK)  # junk at padding: must be ignored
    attention_mask = torch.zeros(len(order), length, dtype=torch.long)
    for row, i in enumerate(order):
        seq = SEQUENCES[i]
        start = length - len(seq) if row % 2 else 0  # odd rows left-padded
        input_ids[row, start : start + len(seq)] = torch.tensor(seq)
        attention_mask[row, start : start + len(seq)] = 1
    with torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask, noise_level=torch.tensor([NOISE[i] for i in order]))
    assert out.logits.shape == (len(order), length, VOCAB)
    assert out.gap_logits.shape == (len(order), length, model.config.max_gap + 1)
    for row in range(len(order)):
        valid = attention_mask[row].bool()
        logits, gap = packed[row]
        torch.testing.assert_close(out.logits[row, valid], logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.gap_logits[row, valid][:-1], gap, atol=1e-5, rtol=1e-5)


def test_padded_input_without_mask_is_one_full_sequence_each() -> None:
    model = tiny_model("dit")
    ids = torch.tensor([SEQUENCES[0], SEQUENCES[0]])
    with torch.no_grad():
        out = model(ids)
    alone = run_packed(model, [0])[0][0]
    for row in range(2):
        torch.testing.assert_close(out.logits[row], alone, atol=1e-5, rtol=1e-5)


def _with_backend(variant: str, backend: str, reference: torch.nn.Module) -> torch.nn.Module:
    model = tiny_model(variant, attn_implementation=backend)
    model.load_state_dict(reference.state_dict())
    assert model.config._attn_implementation == backend
    return model.eval()


@pytest.mark.parametrize("variant", ["dit", "llama-adaln-time"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_matches_sdpa(variant: str, dtype: torch.dtype) -> None:
    sdpa = tiny_model(variant, attn_implementation="sdpa")
    eager = _with_backend(variant, "eager", sdpa)
    sdpa, eager = sdpa.to(dtype), eager.to(dtype)
    ids, cu, noise = packed_batch([0, 1, 2, 3])
    with torch.no_grad():
        a = sdpa(ids, cu_seqlens=cu, noise_level=noise)
        b = eager(ids, cu_seqlens=cu, noise_level=noise)
    assert a.logits.dtype == dtype
    if dtype == torch.float32:  # same maths, different kernels
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.gap_logits, b.gap_logits, atol=1e-5, rtol=1e-5)
        return
    # bf16: both are 8-bit-mantissa approximations of the fp32 numbers (eager softmaxes in fp32, sdpa does not). Over
    # two perturbed layers they drift by up to ~4 % of the largest |logit| (measured 0.10-0.18 on |logit| <= 6); allow
    # 6 % of the fp32 scale between the backends and to the fp32 reference.
    reference = tiny_model(variant, attn_implementation="sdpa")
    reference.load_state_dict({k: v.float() for k, v in sdpa.state_dict().items()})
    with torch.no_grad():
        r = reference(ids, cu_seqlens=cu, noise_level=noise)
    for name in ("logits", "gap_logits"):
        ref = getattr(r, name)
        atol = 0.06 * ref[torch.isfinite(ref)].abs().max().item()
        x, y = getattr(a, name).float(), getattr(b, name).float()
        torch.testing.assert_close(x, y, atol=atol, rtol=0, msg=f"{name}: sdpa vs eager in bf16")
        torch.testing.assert_close(x, ref, atol=atol, rtol=0, msg=f"{name}: bf16 sdpa vs fp32")
        torch.testing.assert_close(y, ref, atol=atol, rtol=0, msg=f"{name}: bf16 eager vs fp32")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("backend", ["varlen_attn", "flash_attention_2"])
def test_cuda_varlen_backends_match_sdpa(backend: str, dtype: torch.dtype) -> None:
    """Varlen flash kernels (no padding) give the numbers of sdpa (padded) on CUDA. Flash kernels compute in half
    precision, so fp32 models are compared at bf16 tolerance."""
    if backend == "flash_attention_2":
        pytest.importorskip("flash_attn")
    device = torch.device("cuda")
    sdpa = tiny_model("llama-adaln-time", attn_implementation="sdpa")
    fast = _with_backend("llama-adaln-time", backend, sdpa)
    sdpa, fast = sdpa.to(device=device, dtype=dtype), fast.to(device=device, dtype=dtype)
    ids, cu, noise = packed_batch([0, 1, 2, 3])
    ids, cu, noise = ids.to(device), cu.to(device), noise.to(device)
    with torch.no_grad():
        a = sdpa(ids, cu_seqlens=cu, noise_level=noise)
        b = fast(ids, cu_seqlens=cu, noise_level=noise)
    torch.testing.assert_close(a.logits.float(), b.logits.float(), atol=6e-2, rtol=3e-2)
    torch.testing.assert_close(a.gap_logits.float(), b.gap_logits.float(), atol=6e-2, rtol=3e-2)
    # and packing invariance holds on this backend too
    alone_ids, alone_cu, alone_noise = (x.to(device) for x in packed_batch([1]))
    with torch.no_grad():
        alone = fast(alone_ids, cu_seqlens=alone_cu, noise_level=alone_noise).logits
    start, end = (int(x) for x in cu[1:3])
    torch.testing.assert_close(b.logits[start:end].float(), alone.float(), atol=2e-2, rtol=2e-2)


def test_varlen_backend_on_cpu_raises_clear_error() -> None:
    model = tiny_model("dit", attn_implementation="varlen_attn")
    ids, cu, noise = packed_batch([0])
    with pytest.raises(RuntimeError, match="CUDA"):
        model(ids, cu_seqlens=cu)


# ---------------------------------------------------------------------------------------------------------------
# Heads, losses, gradients
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mask_logit_is_minus_inf(variant: str) -> None:
    model = tiny_model(variant)
    ids, cu, noise = packed_batch([0, 1, 2, 3])
    with torch.no_grad():
        out = model(ids, cu_seqlens=cu, noise_level=noise)
    assert torch.isneginf(out.logits[:, MASK]).all()
    others = torch.cat([out.logits[:, :MASK], out.logits[:, MASK + 1 :]], dim=1)
    assert torch.isfinite(others).all()
    assert torch.isfinite(out.gap_logits).all()
    assert torch.isneginf(model.token_logits(torch.randn(5, 32))[:, MASK]).all()


def training_example() -> dict[str, torch.Tensor]:
    """x0 = BOS 5 6 7 8 9 EOS with u making 6 and 8 masks, 9 removed; plus a step-0 example (n = 3) and an
    empty-interior one (x0 = BOS EOS)."""
    ignore = -100
    ids = [BOS, 5, MASK, 7, MASK, EOS] + [BOS, EOS] + [BOS, EOS]
    labels = [ignore, ignore, 6, ignore, 8, ignore] + [ignore] * 4
    gaps = [0, 0, 0, 0, 1, ignore] + [3, ignore] + [0, ignore]
    return dict(
        input_ids=torch.tensor(ids),
        cu_seqlens=torch.tensor([0, 6, 8, 10], dtype=torch.int32),
        noise_level=torch.tensor([5 / 6, 0.0, 1.0]),
        labels=torch.tensor(labels),
        gap_labels=torch.tensor(gaps),
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradients_reach_both_heads_and_backbone(variant: str) -> None:
    model = tiny_model(variant).train()
    out = model(**training_example())
    assert out.logits is None and out.gap_logits is None  # only the loss by default when targets are given
    assert torch.isfinite(out.loss) and out.token_loss > 0 and out.gap_loss > 0
    torch.testing.assert_close(out.loss, out.token_loss + model.config.gap_loss_weight * out.gap_loss)
    out.loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


def test_gradients_at_initialisation_reach_heads_and_backbone() -> None:
    """Fresh init (zero adaLN, so DiT blocks start as identities): heads, embeddings and the adaLN layers learn."""
    torch.manual_seed(0)
    model = ElasticMDMForDiffusionLM(tiny_config(block_type="dit", time_conditioning=True)).train()
    model(**training_example()).loss.backward()
    for name in (
        "lm_head.weight",
        "gap_head.dense.weight",
        "gap_head.out_proj.weight",
        "model.embed_tokens.weight",
        "model.layers.0.adaln.weight",
        "model.final_adaln.weight",
    ):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_loss_matches_manual_cross_entropy() -> None:
    model = tiny_model("llama-adaln-time")
    batch = training_example()
    with torch.no_grad():
        out = model(**batch, return_logits=True)
    labels, gaps = batch["labels"], batch["gap_labels"]
    token_rows = labels != -100
    expected_token = torch.nn.functional.cross_entropy(out.logits[token_rows], labels[token_rows])
    gap_rows = gaps != -100
    expected_gap = torch.nn.functional.cross_entropy(out.gap_logits[gap_rows], gaps[gap_rows])
    torch.testing.assert_close(out.token_loss, expected_token)
    torch.testing.assert_close(out.gap_loss, expected_gap)


@pytest.mark.parametrize("variant", ["dit", "llama-adaln-time"])
def test_empty_interior_losses_are_finite(variant: str) -> None:
    """x0 = BOS EOS, n = 0, no masks: token loss is exactly 0 (and finite), gap loss finite, backward works."""
    model = tiny_model(variant).train()
    out = model(
        input_ids=torch.tensor([BOS, EOS, BOS, EOS]),
        cu_seqlens=torch.tensor([0, 2, 4], dtype=torch.int32),
        noise_level=torch.tensor([0.0, 1.0]),
        labels=torch.full((4,), -100),
        gap_labels=torch.tensor([0, -100, 0, -100]),
    )
    assert out.token_loss.item() == 0.0 and torch.isfinite(out.token_loss)
    assert torch.isfinite(out.gap_loss) and out.gap_loss > 0
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.gap_head.out_proj.weight.grad.abs().sum() > 0
    # no supervised row at all: both terms 0, still differentiable
    model.zero_grad()
    out = model(
        input_ids=torch.tensor([[BOS, EOS]]), labels=torch.full((1, 2), -100), gap_labels=torch.full((1, 2), -100)
    )
    assert out.loss.item() == 0.0 and out.token_loss.item() == 0.0 and out.gap_loss.item() == 0.0
    out.loss.backward()


def test_padded_targets_match_packed_targets() -> None:
    model = tiny_model("dit-time-sum")
    batch = training_example()
    with torch.no_grad():
        packed = model(**batch)
        length = 6
        ids = torch.full((3, length), PAD)
        labels = torch.full((3, length), -100)
        gaps = torch.full((3, length), -100)
        mask = torch.zeros(3, length, dtype=torch.long)
        for row, (a, b) in enumerate(pairwise(batch["cu_seqlens"].tolist())):
            ids[row, : b - a] = batch["input_ids"][a:b]
            labels[row, : b - a] = batch["labels"][a:b]
            gaps[row, : b - a] = batch["gap_labels"][a:b]
            mask[row, : b - a] = 1
        padded = model(ids, attention_mask=mask, labels=labels, gap_labels=gaps, noise_level=batch["noise_level"])
    torch.testing.assert_close(padded.loss, packed.loss, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_same_gradients() -> None:
    model = tiny_model("llama-adaln-time").train()
    model(**training_example()).loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert model.model.gradient_checkpointing
    model(**training_example()).loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, reference[name], atol=1e-6, rtol=1e-5, msg=name)


def test_tied_word_embeddings() -> None:
    model = tiny_model("llama", tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


# ---------------------------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dit_model() -> ElasticMDMForDiffusionLM:
    return tiny_model("dit-time-sum")


def test_too_long_sequence_raises(dit_model) -> None:
    ids = torch.full((MAX_POS + 1,), 5)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        dit_model(ids, cu_seqlens=torch.tensor([0, MAX_POS + 1]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        dit_model(ids[None])
    # exactly max_position_embeddings is fine, and a long padded row whose real part fits is fine too
    dit_model(ids[:MAX_POS], cu_seqlens=torch.tensor([0, MAX_POS]))
    mask = torch.zeros(1, MAX_POS + 1, dtype=torch.long)
    mask[0, :10] = 1
    dit_model(ids[None], attention_mask=mask)


@pytest.mark.parametrize(
    "make_input",
    [
        lambda: dict(input_ids=torch.zeros(0, dtype=torch.long), cu_seqlens=torch.tensor([0], dtype=torch.int32)),
        lambda: dict(input_ids=torch.zeros(0, dtype=torch.long), cu_seqlens=torch.tensor([0, 0], dtype=torch.int32)),
        lambda: dict(input_ids=torch.zeros(2, 0, dtype=torch.long)),
        lambda: dict(input_ids=torch.zeros(0, 5, dtype=torch.long)),
        lambda: dict(input_ids=torch.ones(2, 4, dtype=torch.long), attention_mask=torch.zeros(2, 4, dtype=torch.long)),
    ],
    ids=["packed-no-sequence", "packed-zero-tokens", "padded-zero-length", "padded-zero-batch", "all-padding"],
)
def test_empty_batch_raises(dit_model, make_input) -> None:
    with pytest.raises(ValueError, match="empty"):
        dit_model(**make_input())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool])
def test_non_integer_input_ids_raise(dit_model, dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match="integer"):
        dit_model(torch.ones(1, 4, dtype=dtype))


@pytest.mark.parametrize("shape", [(), (1,), (2, 1), (3,)])
def test_noise_level_wrong_shape_raises(dit_model, shape: tuple[int, ...]) -> None:
    ids, cu, _ = packed_batch([0, 1])  # batch of 2
    with pytest.raises(ValueError, match="noise_level"):
        dit_model(ids, cu_seqlens=cu, noise_level=torch.full(shape, 0.5))


def test_packed_input_needs_cu_seqlens(dit_model) -> None:
    with pytest.raises(ValueError, match="cu_seqlens"):
        dit_model(torch.tensor([BOS, 5, EOS]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        dit_model(torch.tensor([[BOS, 5, EOS]]), cu_seqlens=torch.tensor([0, 3]))


def test_cu_seqlens_inconsistent_with_tokens_raises(dit_model) -> None:
    """cu_seqlens[-1] must equal the number of tokens: a clear ValueError, not a shape error deep inside."""
    with pytest.raises(ValueError, match="cu_seqlens"):
        dit_model(torch.tensor([BOS, 5, 6, 7, EOS]), cu_seqlens=torch.tensor([0, 3], dtype=torch.int32))


# ---------------------------------------------------------------------------------------------------------------
# Saving, loading, remote code
# ---------------------------------------------------------------------------------------------------------------

FIXED_IDS = [BOS, 5, MASK, 7, MASK, EOS, BOS, 9, 10, MASK, EOS]
# Reloaded weights are bitwise equal, but safetensors hands out tensors at addresses that are only 4-byte aligned
# (mmap offsets), and the CPU GEMM kernels then take another path: a few ulps (measured 4e-6 on |logits| <= 6).
RELOAD_TOL = dict(atol=1e-5, rtol=1e-5)
FIXED_CU = [0, 6, 11]
FIXED_NOISE = [0.25, 0.75]


def _fixed_logits(model) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model(
            torch.tensor(FIXED_IDS),
            cu_seqlens=torch.tensor(FIXED_CU, dtype=torch.int32),
            noise_level=torch.tensor(FIXED_NOISE),
        )
    return out.logits, out.gap_logits


def _save(variant: str, directory: Path) -> ElasticMDMForDiffusionLM:
    model = tiny_model(variant, seed=3)
    model.generation_config.num_steps = 7
    model.generation_config.schedule = "cosine"
    model.save_pretrained(directory)
    return model


def test_save_pretrained_layout(tmp_path: Path) -> None:
    _save("dit", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "elastic_mdm"
    assert set(config["auto_map"]) >= {"AutoConfig", "AutoModel", "AutoModelForMaskedLM"}
    assert config["auto_map"]["AutoConfig"] == "configuration_elastic_mdm.ElasticMDMConfig"
    assert config["auto_map"]["AutoModel"] == "modeling_elastic_mdm.ElasticMDMForDiffusionLM"
    assert config["auto_map"]["AutoModelForMaskedLM"] == "modeling_elastic_mdm.ElasticMDMForDiffusionLM"
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["num_steps"] == 7 and generation["schedule"] == "cosine"
    # remote code: the modeling file and everything it imports relatively, flat in the folder
    for name in (
        "configuration_elastic_mdm.py",
        "modeling_elastic_mdm.py",
        "generation_elastic_mdm.py",
        "generation_config_elastic_mdm.py",
        "sampling_state_elastic_mdm.py",
        "sampler_loop_elastic_mdm.py",
        "sampler_elastic_mdm.py",
        "sampler_mdlm_elastic_mdm.py",
        "streaming_elastic_mdm.py",
        "layers_elastic_mdm.py",
        "attention_elastic_mdm.py",
        "length_lock_elastic_mdm.py",
        "device_reads_elastic_mdm.py",
        "cuda_graphs_elastic_mdm.py",
        "packing_elastic_mdm.py",
        "schedules_elastic_mdm.py",
    ):
        assert (tmp_path / name).is_file(), name


@pytest.mark.parametrize("variant", ["dit", "llama-adaln-time"])
def test_auto_model_reload_in_process(tmp_path: Path, variant: str) -> None:
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

    model = _save(variant, tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), ElasticMDMConfig)
    for auto in (AutoModel, AutoModelForMaskedLM):
        loaded = auto.from_pretrained(tmp_path)
        assert type(loaded) is ElasticMDMForDiffusionLM
        reference = model.state_dict()
        assert loaded.state_dict().keys() == reference.keys()
        for key, value in loaded.state_dict().items():
            assert torch.equal(value, reference[key]), key
        for a, b in zip(_fixed_logits(model), _fixed_logits(loaded), strict=True):
            torch.testing.assert_close(a, b, **RELOAD_TOL)


def test_generation_config_reloaded(tmp_path: Path) -> None:
    """`generation_config.json` (num_steps, schedule) comes back with the model and keeps its class."""
    from transformers import AutoModel

    _save("dit", tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded.generation_config, ElasticMDMGenerationConfig)
    assert loaded.generation_config.num_steps == 7
    assert loaded.generation_config.schedule == "cosine"


REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys
    import torch

    spec = importlib.util.find_spec("elastic_mdm")
    report = {"elastic_mdm_importable": spec is not None, "sys_path": sys.path}
    from transformers import AutoConfig, AutoModel

    out_dir = sys.argv[1]
    ids, cu, noise = torch.load(out_dir + "/inputs.pt")
    for name in sys.argv[2:]:
        path = out_dir + "/" + name
        config = AutoConfig.from_pretrained(path, trust_remote_code=True)
        model = AutoModel.from_pretrained(path, trust_remote_code=True)
        with torch.no_grad():
            out = model(ids, cu_seqlens=cu, noise_level=noise)
        gen = model.generate(num_return_sequences=2, num_steps=4, seed=0, return_dict_in_generate=True)
        sequences, lengths = gen.sequences, gen.lengths
        torch.save(
            {"logits": out.logits, "gap_logits": out.gap_logits, "sequences": sequences, "lengths": lengths},
            out_dir + "/" + name + "_remote.pt",
        )
        report[name] = {
            "config_class": type(config).__module__ + "." + type(config).__name__,
            "model_class": type(model).__module__ + "." + type(model).__name__,
            "generation_num_steps": getattr(model.generation_config, "num_steps", None),
            "can_generate": model.can_generate(),
        }
    print("REPORT=" + json.dumps(report))
    """
)


def test_remote_code_round_trip(tmp_path: Path, isolated_python) -> None:
    """save_pretrained, then load with trust_remote_code in a fresh interpreter where `elastic_mdm` is not importable:
    same logits, and generate works from the copied code."""
    variants = ["dit", "llama-adaln-time"]
    models = {v: _save(v, tmp_path / v) for v in variants}
    torch.save(
        (torch.tensor(FIXED_IDS), torch.tensor(FIXED_CU, dtype=torch.int32), torch.tensor(FIXED_NOISE)),
        tmp_path / "inputs.pt",
    )
    result = isolated_python(REMOTE_SCRIPT, str(tmp_path), *variants, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("REPORT="))[7:])
    assert not report["elastic_mdm_importable"], report["sys_path"]
    assert not any(str(REPO_ROOT) == p for p in report["sys_path"])
    for variant in variants:
        info = report[variant]
        assert info["model_class"].startswith("transformers_modules.") and info["model_class"].endswith(
            "modeling_elastic_mdm.ElasticMDMForDiffusionLM"
        ), info
        assert info["config_class"].endswith("configuration_elastic_mdm.ElasticMDMConfig"), info
        assert info["can_generate"]
        remote = torch.load(tmp_path / f"{variant}_remote.pt")
        for a, b in zip((remote["logits"], remote["gap_logits"]), _fixed_logits(models[variant]), strict=True):
            torch.testing.assert_close(a, b, **RELOAD_TOL)
        # loaded the same way in this process (same weights at the same alignment): bitwise the same numbers
        local = ElasticMDMForDiffusionLM.from_pretrained(tmp_path / variant)
        for a, b in zip((remote["logits"], remote["gap_logits"]), _fixed_logits(local), strict=True):
            assert torch.equal(a, b)
        sequences, lengths = remote["sequences"], remote["lengths"]
        assert sequences.shape[0] == 2 and lengths.shape == (2,)
        for row, length in zip(sequences, lengths.tolist(), strict=True):
            assert 2 <= length <= MAX_POS
            assert row[0] == BOS and row[length - 1] == EOS
            assert not (row[:length] == MASK).any()
        # same code, same weights, same seed: the in-process sampler draws the same sequences
        out = local.generate(num_return_sequences=2, num_steps=4, seed=0, return_dict_in_generate=True)
        local_sequences, local_lengths = out.sequences, out.lengths
        assert torch.equal(local_lengths, lengths) and torch.equal(local_sequences, sequences)
    # the saved generation config travels with the remote code too
    assert all(report[v]["generation_num_steps"] == 7 for v in variants), report


@pytest.mark.parametrize("block_type", ["dit", "llama"])
def test_adaln_starts_at_zero(block_type: str, tmp_path: Path) -> None:
    """adaLN is zero at initialisation (DiT blocks start as the identity, a retrofitted llama as the original), also
    when it is new in a checkpoint that lacks it."""
    config = tiny_config(block_type=block_type, adaln=True)
    model = ElasticMDMForDiffusionLM(config)
    adaln = [m for m in model.modules() if type(m).__name__ == "ElasticMDMAdaLN"]
    assert len(adaln) == config.num_hidden_layers + 1
    assert all(bool((m.weight == 0).all() and (m.bias == 0).all()) for m in adaln)
    if block_type == "llama":
        plain = ElasticMDMForDiffusionLM(tiny_config(block_type="llama", adaln=False))
        plain.save_pretrained(tmp_path)
        grown = ElasticMDMForDiffusionLM.from_pretrained(tmp_path, adaln=True)
        ids, cu = torch.tensor(FIXED_IDS), torch.tensor(FIXED_CU, dtype=torch.int32)
        torch.testing.assert_close(grown(ids, cu_seqlens=cu).logits, plain(ids, cu_seqlens=cu).logits)

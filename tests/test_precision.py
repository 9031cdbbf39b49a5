"""bf16 as DeepSpeed casts it (`model.to(torch.bfloat16)`), autocast, and the attention names Transformers resolves.

A bf16 model reached by `from_pretrained(dtype=torch.bfloat16)` and one reached by `.to(torch.bfloat16)` must compute
the same numbers; the fp32 pieces of the model (RoPE angles, the eager reference attention) must stay fp32 however the
model was cast or autocast.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import BOS, EOS, random_model, tiny_config

from elastic_mdm import ElasticMDMForDiffusionLM
from elastic_mdm.attention_elastic_mdm import eager_attention, sdpa_attention
from elastic_mdm.layers_elastic_mdm import ElasticMDMAttention
from elastic_mdm.packing_elastic_mdm import PackedSequences

LONG = 1024  # positions: the rotary angle reaches ~1000 rad, where a bf16 frequency is ~0.2 rad off


def long_model(tmp_path: Path) -> Path:
    """A perturbed 1024-position model saved in fp32."""
    model = random_model(tame=False, max_position_embeddings=LONG + 2)
    model.save_pretrained(tmp_path / "fp32")
    return tmp_path / "fp32"


def test_rope_stays_fp32_when_the_model_is_cast_to_bf16(tmp_path: Path) -> None:
    """`from_pretrained(dtype=bf16)` and `from_pretrained().to(bf16)` give identical logits on a long sequence, and
    both compute the fp32 model's rotary angles."""
    path = long_model(tmp_path)
    fp32 = ElasticMDMForDiffusionLM.from_pretrained(path).eval()
    loaded = ElasticMDMForDiffusionLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    cast = ElasticMDMForDiffusionLM.from_pretrained(path).eval().to(torch.bfloat16)  # DeepSpeed's bf16 engine
    assert cast.lm_head.weight.dtype == loaded.lm_head.weight.dtype == torch.bfloat16
    positions = torch.arange(LONG)
    reference = fp32.model.rotary_emb(positions)
    for model in (loaded, cast):
        assert model.model.rotary_emb.inv_freq.dtype == torch.float32
        for angle, expected in zip(model.model.rotary_emb(positions), reference, strict=True):
            torch.testing.assert_close(angle, expected, atol=0, rtol=0)
    ids = torch.randint(4, 64, (1, LONG), generator=torch.Generator().manual_seed(0))
    ids[0, 0], ids[0, -1] = BOS, EOS
    with torch.no_grad():
        a, b = loaded(input_ids=ids).logits, cast(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_rope_frequencies_follow_the_device_and_survive_a_round_trip() -> None:
    """`.to()` moves the frequencies; `.half()` then `.float()` restores them exactly (they are recomputed, not
    rounded and cast back)."""
    model = random_model(tame=False)
    expected = model.model.rotary_emb.inv_freq.clone()
    model.half().float()
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, expected, atol=0, rtol=0)
    meta = random_model(tame=False).to("meta")
    assert meta.model.rotary_emb.inv_freq.device.type == "meta"
    assert meta.model.rotary_emb.inv_freq.dtype == torch.float32


def packed_qkv(lengths: list[int], heads: int = 2, dim: int = 8) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    tokens = sum(lengths)
    q, k, v = (torch.randn(tokens, heads, dim, generator=generator) * 3 for _ in range(3))
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    return q, k, v, PackedSequences.from_cu_seqlens(cu, max(lengths))


def test_eager_reference_attention_ignores_autocast() -> None:
    """The eager backend is the fp32 reference: under bf16 autocast it returns the fp32 numbers (sdpa, which
    autocast may lower, is the contrast that shows the autocast region is active)."""
    q, k, v, packed = packed_qkv([5, 9, 3])
    reference = eager_attention(q, k, v, packed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = eager_attention(q, k, v, packed)
        lowered = torch.matmul(q, k.transpose(-1, -2))
    assert lowered.dtype == torch.bfloat16  # autocast is on for matmuls here
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, reference, atol=0, rtol=0)


def test_hub_flash_kernel_names_run_the_packed_kernel(monkeypatch) -> None:
    """With flash-attn absent and `kernels` installed, Transformers >= 5.24 renames `flash_attention_2` to the Hub
    kernel `kernels-community/flash-attn2`; the model runs that kernel's varlen function on its packed bounds."""
    import transformers.modeling_flash_attention_utils as flash_utils

    calls: list[dict] = []

    def fake_varlen(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal):
        calls.append(dict(cu=cu_seqlens_q.tolist(), max=max_seqlen_q, causal=causal, dtype=q.dtype))
        packed = PackedSequences.from_cu_seqlens(cu_seqlens_q, max_seqlen_q)
        return sdpa_attention(q, k, v, packed), None  # (out, lse) like FA3

    monkeypatch.setattr(flash_utils, "lazy_import_flash_attention", lambda name: ((None, fake_varlen), None))
    sdpa = random_model(tame=False)
    kernel = random_model(tame=False)
    kernel.config._attn_implementation = "kernels-community/flash-attn2"
    ids = torch.tensor([BOS, 5, 6, 7, EOS, BOS, 9, EOS])
    cu = torch.tensor([0, 5, 8], dtype=torch.int32)
    with torch.no_grad():
        a, b = sdpa(ids, cu_seqlens=cu).logits, kernel(ids, cu_seqlens=cu).logits
    assert calls and calls[0] == dict(cu=[0, 5, 8], max=5, causal=False, dtype=torch.bfloat16)
    torch.testing.assert_close(a, b, atol=6e-2, rtol=3e-2)  # the kernel runs in bf16


@pytest.mark.parametrize("name", ["paged|eager", "kernels-community/some-other-kernel", "flex_attention"])
def test_attention_without_a_packed_kernel_is_refused_at_init(name: str) -> None:
    config = tiny_config()
    config._attn_implementation = name
    with pytest.raises(ValueError, match=r"attn_implementation='.*' has no packed \(varlen\) kernel.*sdpa"):
        ElasticMDMAttention(config)


def test_generator_on_another_device_is_refused() -> None:
    """A CPU `torch.Generator` cannot drive the draws of a model on another device (it fails deep inside a draw on
    CUDA): `generate` refuses it up front, naming the fix. The `meta` device stands in for CUDA here."""
    from elastic_mdm.generation_elastic_mdm import check_generator_device

    model = random_model().to("meta")
    with pytest.raises(ValueError, match=r"generator is on cpu but the model is on meta.*torch.Generator\(device="):
        model.generate(generator=torch.Generator().manual_seed(0), num_steps=4)
    with pytest.raises(ValueError, match="generator is on cpu but the model is on cuda:0"):
        check_generator_device(torch.Generator(), torch.device("cuda:0"))
    check_generator_device(torch.Generator(), torch.device("cpu"))  # same device: accepted
    check_generator_device(None, torch.device("cuda:0"))

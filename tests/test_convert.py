"""Converters: MDLM and LLaDA checkpoints in their original layouts -> Elastic-MDM folders.

Tiny checkpoints are written with the real config.json field names and tensor keys (design §7). The reference forwards
below re-implement each source architecture from its own conventions, on the raw source state dict, independently of
`elastic_mdm`; the converted model must give the same token logits (fp32; the mask column, -inf in ours, excluded).
"""

from __future__ import annotations

import json
import math
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from elastic_mdm import ElasticMDMConfig, ElasticMDMForDiffusionLM
from elastic_mdm.conversion.checkpoint_io import SAFE_INDEX
from elastic_mdm.conversion.convert import convert_llada_checkpoint, convert_mdlm_checkpoint
from elastic_mdm.conversion.formats import translate
from elastic_mdm.conversion.llada import LLADA, llada_config_kwargs
from elastic_mdm.conversion.lora import lora_parameter_count
from elastic_mdm.conversion.mdlm import MDLM, mdlm_config_kwargs
from elastic_mdm.loading.tokenizers import check_vocab

REPO_ROOT = Path(__file__).resolve().parents[1]
LOGIT_TOL = dict(rtol=1e-5, atol=1e-5)  # fp32, same math in a different order

# ---------------------------------------------------------------------------------------------------------------
# Tiny checkpoints in the original layouts
# ---------------------------------------------------------------------------------------------------------------

# the flat config.json of the Hub export (kuleshov-group/mdlm-owt), tiny sizes; GPT-2 vocabulary + [MASK]
MDLM_CONFIG = {
    "architectures": ["MDLM"],
    "auto_map": {"AutoConfig": "configuration_mdlm.MDLMConfig", "AutoModelForMaskedLM": "modeling_mdlm.MDLM"},
    "model_type": "mdlm",
    "vocab_size": 50258,
    "model_length": 24,
    "hidden_dim": 32,
    "cond_dim": 16,
    "n_blocks": 2,
    "n_heads": 4,
    "dropout": 0.1,
    "time_conditioning": False,
}
MDLM_MASK, GPT2_EOT = 50257, 50256

# LLaDA-8B-Base's config.json fields (OLMo style), tiny sizes and a padded embedding (embedding_size > vocab_size)
LLADA_CONFIG = {
    "activation_type": "silu",
    "alibi": False,
    "architectures": ["LLaDAModelLM"],
    "attention_layer_norm": False,
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM"},
    "bias_for_layer_norm": False,
    "block_group_size": 1,
    "block_type": "llama",
    "d_model": 32,
    "embedding_size": 64,
    "eos_token_id": 61,
    "flash_attention": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "init_std": 0.02,
    "input_emb_norm": False,
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "mask_token_id": 60,
    "max_sequence_length": 24,
    "mlp_hidden_size": 48,
    "mlp_ratio": 4,
    "model_type": "llada",
    "multi_query_attention": None,
    "n_heads": 4,
    "n_kv_heads": 4,
    "n_layers": 3,
    "pad_token_id": 61,
    "rms_norm_eps": 1e-05,
    "rope": True,
    "rope_full_precision": True,
    "rope_theta": 500000.0,
    "scale_logits": False,
    "vocab_size": 62,
    "weight_tying": False,
    "bos_token_id": 59,  # not in the real file (the converter defaults to LLaDA's 126080): the tiny vocab needs its own
}


def _llada_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    d, f, rows = config["d_model"], config["mlp_hidden_size"], config["embedding_size"]
    shapes = {"model.transformer.wte.weight": (rows, d)}
    block = {"attn_norm": (d,), "q_proj": (d, d), "k_proj": (d, d), "v_proj": (d, d), "attn_out": (d, d)}
    block |= {"ff_norm": (d,), "ff_proj": (f, d), "up_proj": (f, d), "ff_out": (d, f)}
    for i in range(config["n_layers"]):
        shapes |= {f"model.transformer.blocks.{i}.{name}.weight": shape for name, shape in block.items()}
    shapes["model.transformer.ln_f.weight"] = (d,)
    if not config["weight_tying"]:
        shapes["model.transformer.ff_out.weight"] = (rows, d)
    return shapes


def _mdlm_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    d, c, v = config["hidden_dim"], config["cond_dim"], config["vocab_size"]
    shapes = {"backbone.vocab_embed.embedding": (v, d)}
    shapes |= {"backbone.sigma_map.mlp.0.weight": (c, 256), "backbone.sigma_map.mlp.0.bias": (c,)}
    shapes |= {"backbone.sigma_map.mlp.2.weight": (c, c), "backbone.sigma_map.mlp.2.bias": (c,)}
    block = {"norm1.weight": (d,), "attn_qkv.weight": (3 * d, d), "attn_out.weight": (d, d), "norm2.weight": (d,)}
    block |= {"mlp.0.weight": (4 * d, d), "mlp.0.bias": (4 * d,), "mlp.2.weight": (d, 4 * d), "mlp.2.bias": (d,)}
    block |= {"adaLN_modulation.weight": (6 * d, c), "adaLN_modulation.bias": (6 * d,)}
    for i in range(config["n_blocks"]):
        shapes |= {f"backbone.blocks.{i}.{name}": shape for name, shape in block.items()}
    shapes |= {"backbone.output_layer.norm_final.weight": (d,)}
    shapes |= {"backbone.output_layer.linear.weight": (v, d), "backbone.output_layer.linear.bias": (v,)}
    shapes |= {"backbone.output_layer.adaLN_modulation.weight": (2 * d, c)}
    shapes |= {"backbone.output_layer.adaLN_modulation.bias": (2 * d,)}
    return shapes


def random_state(shapes: dict[str, tuple[int, ...]], seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random weights of moderate scale: norms near 1, matrices ~ 1/sqrt(fan_in), biases ~ 0.1. Nothing is zero (MDLM
    zero-initialises adaLN and its head; a trained checkpoint is not zero, and zeros would hide mapping errors)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=generator)
        if "norm" in key:
            noise = 1.0 + 0.1 * noise
        else:
            noise = noise / math.sqrt(shape[1]) if len(shape) == 2 else 0.1 * noise
        state[key] = noise.to(dtype)
    return state


def mdlm_state(config: dict = MDLM_CONFIG, seed: int = 0) -> dict[str, torch.Tensor]:
    state = random_state(_mdlm_shapes(config), seed)
    head_dim = config["hidden_dim"] // config["n_heads"]
    state["backbone.rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    return state


def write_checkpoint(folder: Path, config: dict, state: dict[str, torch.Tensor], layout: str, shards: int = 3) -> Path:
    """`layout`: `safetensors` (one model.safetensors), `sharded` (shards + model.safetensors.index.json, as the Hub
    LLaDA-8B repos) or `bin` (pytorch_model.bin)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if layout == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    elif layout == "safetensors":
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    else:
        keys = list(state)
        names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
        weight_map = {key: names[i * shards // len(keys)] for i, key in enumerate(keys)}
        for name in names:
            save_file({k: state[k] for k, file in weight_map.items() if file == name}, folder / name)
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2))
    return folder


def llada_checkpoint(folder: Path, dtype=torch.float32, **fields) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    config = {**LLADA_CONFIG, **fields}
    state = random_state(_llada_shapes(config), seed=1, dtype=dtype)
    return write_checkpoint(folder, config, state, "sharded"), config, state


def mdlm_checkpoint(folder: Path, layout: str = "safetensors", **fields) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    config = {**MDLM_CONFIG, **fields}
    state = mdlm_state(config)
    return write_checkpoint(folder, config, state, layout), config, state


# ---------------------------------------------------------------------------------------------------------------
# Reference forwards of the source architectures (one sequence [L] -> logits [L, V]), on the raw source state dict
# ---------------------------------------------------------------------------------------------------------------


def _linear(state: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, state[f"{name}.weight"], state.get(f"{name}.bias"))


def mdlm_reference_logits(state: dict[str, torch.Tensor], config: dict, ids: torch.Tensor) -> torch.Tensor:
    """MDLM's DiT (models/dit.py) in eval mode with `time_conditioning=false`: sigma = 0 through sigma_map,
    `c = silu(sigma_map(0))`; bias-free fp32 LayerNorm times weight; adaLN chunks (shift_msa, scale_msa, gate_msa,
    shift_mlp, scale_mlp, gate_mlp); `x + gate * f(x * (1 + scale) + shift)`; fused QKV `(three h d)`; flash-attn's
    non-interleaved rotary on q and k with the stored `inv_freq`; full bidirectional attention; adaLN final layer."""
    d, heads = config["hidden_dim"], config["n_heads"]
    dim, length = d // heads, ids.shape[0]
    x = state["backbone.vocab_embed.embedding"][ids]
    half = 128  # frequency_embedding_size 256
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    sigma = torch.zeros(1)
    t_freq = torch.cat([torch.cos(sigma[:, None] * freqs), torch.sin(sigma[:, None] * freqs)], dim=-1)
    c = F.silu(_linear(state, "backbone.sigma_map.mlp.2", F.silu(_linear(state, "backbone.sigma_map.mlp.0", t_freq))))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), state["backbone.rotary_emb.inv_freq"])
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # [L, 1, dim / 2]

    def rotary(t: torch.Tensor) -> torch.Tensor:  # [L, H, dim]: first half x1, second half x2
        x1, x2 = t[..., : dim // 2], t[..., dim // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def norm(name: str, h: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(h, (d,)) * state[name]

    for i in range(config["n_blocks"]):
        p = f"backbone.blocks.{i}."
        mods = _linear(state, p + "adaLN_modulation", c).chunk(6, dim=-1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        qkv = _linear(state, p + "attn_qkv", norm(p + "norm1.weight", x) * (1 + scale_msa) + shift_msa)
        q, k, v = qkv.view(length, 3, heads, dim).unbind(1)
        q, k = rotary(q), rotary(k)
        weights = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(dim), dim=-1)
        attention = torch.einsum("hqk,khd->qhd", weights, v).reshape(length, d)
        x = x + gate_msa * _linear(state, p + "attn_out", attention)
        h = norm(p + "norm2.weight", x) * (1 + scale_mlp) + shift_mlp
        mlp = _linear(state, p + "mlp.2", F.gelu(_linear(state, p + "mlp.0", h), approximate="tanh"))
        x = x + gate_mlp * mlp
    shift, scale = _linear(state, "backbone.output_layer.adaLN_modulation", c).chunk(2, dim=-1)
    h = norm("backbone.output_layer.norm_final.weight", x) * (1 + scale) + shift
    return _linear(state, "backbone.output_layer.linear", h)


def llada_reference_logits(state: dict[str, torch.Tensor], config: dict, ids: torch.Tensor) -> torch.Tensor:
    """LLaDA's LLaDALlamaBlock stack: RMSNorm `w * x * rsqrt(mean(x²) + eps)`; q/k/v; OLMo RoPE in full precision
    (positions cat(freqs, freqs), `rotate_half` via view(..., 2, hs // 2)); SDPA without any mask; `attn_out`;
    SwiGLU with `ff_proj` as the gate: `ff_out(silu(ff_proj(h)) * up_proj(h))`; `ln_f`; `ff_out` (or tied `wte`)."""
    d, heads, eps = config["d_model"], config["n_heads"], config["rms_norm_eps"]
    dim, length = d // heads, ids.shape[0]
    x = state["model.transformer.wte.weight"][ids]
    inv_freq = 1.0 / (config["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = torch.einsum("i,j->ij", torch.arange(length, dtype=torch.float32), inv_freq)
    positions = torch.cat((freqs, freqs), dim=-1)
    pos_sin, pos_cos = positions.sin(), positions.cos()

    def rope(t: torch.Tensor) -> torch.Tensor:  # [H, L, dim]
        t1, t2 = t.view(heads, length, 2, dim // 2).unbind(dim=-2)
        return t * pos_cos + torch.cat((-t2, t1), dim=-1) * pos_sin

    def rms(name: str, h: torch.Tensor) -> torch.Tensor:
        return state[name] * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))

    for i in range(config["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        h = rms(p + "attn_norm.weight", x)
        q, k, v = (
            _linear(state, p + n, h).view(length, heads, dim).transpose(0, 1) for n in ("q_proj", "k_proj", "v_proj")
        )
        attention = F.scaled_dot_product_attention(rope(q), rope(k), v, attn_mask=None, is_causal=False)
        x = x + _linear(state, p + "attn_out", attention.transpose(0, 1).reshape(length, d))
        h = rms(p + "ff_norm.weight", x)
        x = x + _linear(
            state, p + "ff_out", F.silu(_linear(state, p + "ff_proj", h)) * _linear(state, p + "up_proj", h)
        )
    x = rms("model.transformer.ln_f.weight", x)
    head = state["model.transformer.wte.weight" if config["weight_tying"] else "model.transformer.ff_out.weight"]
    return x @ head.T


# ---------------------------------------------------------------------------------------------------------------
# Equivalence
# ---------------------------------------------------------------------------------------------------------------

MAX_DIFFS: dict[str, float] = {}  # printed by `pytest -s` (largest |ours - reference| per case)


def sequences(mask_id: int, vocab: int, lengths=(9, 1, 6)) -> list[torch.Tensor]:
    """A few sequences with random tokens (ids below the mask and a few masks) of different lengths."""
    generator = torch.Generator().manual_seed(7)
    out = []
    for length in lengths:
        ids = torch.randint(0, vocab, (length,), generator=generator)
        ids[torch.rand(length, generator=generator) < 0.3] = mask_id
        out.append(ids)
    return out


def assert_logits_match(case: str, model, reference, seqs: list[torch.Tensor], noise=None) -> None:
    """Single sequence and packed batch: our logits == reference logits on every non-mask column; mask column -inf."""
    mask = model.config.mask_token_id
    keep = torch.ones(model.config.vocab_size, dtype=torch.bool)
    keep[mask] = False
    expected = torch.cat([reference(ids) for ids in seqs])
    lengths = torch.tensor([0] + [len(s) for s in seqs])
    cu_seqlens = lengths.cumsum(0).to(torch.int32)
    with torch.no_grad():
        single = model(seqs[0][None]).logits[0]
        packed = model(torch.cat(seqs), cu_seqlens=cu_seqlens, noise_level=noise).logits
    for ours, ref in ((single, expected[: len(seqs[0])]), (packed, expected)):
        assert torch.isinf(ours[:, mask]).all() and (ours[:, mask] < 0).all()
        torch.testing.assert_close(ours[:, keep], ref[:, keep], **LOGIT_TOL)
        MAX_DIFFS[case] = max(MAX_DIFFS.get(case, 0.0), (ours[:, keep] - ref[:, keep]).abs().max().item())
    # the log-probabilities MDLM / LLaDA sample from (mask excluded) agree as well
    torch.testing.assert_close(packed[:, keep].log_softmax(-1), expected[:, keep].log_softmax(-1), **LOGIT_TOL)


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            out |= {key: f.get_tensor(key) for key in f.keys()}
    return out


def assert_copied(folder: Path, state: dict[str, torch.Tensor], fmt, new: set[str], dropped: frozenset = frozenset()):
    """Every source tensor (but the `dropped` buffers) is in the output under its mapped name, bit for bit; the
    other output tensors are the new modules."""
    out = saved_tensors(folder)
    for key, tensor in state.items():
        if key not in dropped:
            assert torch.equal(out.pop(translate(key, fmt.rules)), tensor), key
    assert out and all(any(part in key for part in new) for key in out), sorted(out)


@pytest.fixture(scope="module", autouse=True)
def report_max_diffs():
    """`pytest -s` prints the largest |ours - reference| logit difference of every equivalence case."""
    yield
    print("\nmax |logit difference| / measurements:", json.dumps(MAX_DIFFS, indent=1))


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_mdlm_converted_logits_equal_mdlm(tmp_path: Path, layout: str) -> None:
    src, config, state = mdlm_checkpoint(tmp_path / "mdlm", layout)
    dst = convert_mdlm_checkpoint(src, tmp_path / "out")
    model = ElasticMDMForDiffusionLM.from_pretrained(dst).eval()
    c = model.config
    assert (c.block_type, c.vocab_size, c.hidden_size, c.num_hidden_layers, c.cond_dim) == ("dit", 50258, 32, 2, 16)
    assert (c.mask_token_id, c.bos_token_id, c.eos_token_id) == (MDLM_MASK, GPT2_EOT, GPT2_EOT)
    assert c.max_position_embeddings == 24 and not c.time_conditioning and c.objective == "mdlm"
    reference = lambda ids: mdlm_reference_logits(state, config, ids)
    assert_logits_match(f"mdlm-{layout}", model, reference, sequences(MDLM_MASK, 50257))
    assert_copied(dst, state, MDLM, new={"gap_head."}, dropped={"backbone.rotary_emb.inv_freq"})


@pytest.mark.parametrize(
    "variant, fields, overrides",
    [
        ("plain", {}, {}),
        ("adaln-time", {}, {"adaln": True, "time_conditioning": True, "cond_dim": 8}),
        ("tied", {"weight_tying": True}, {}),
    ],
)
def test_llada_converted_logits_equal_llada(tmp_path: Path, variant: str, fields: dict, overrides: dict) -> None:
    src, config, state = llada_checkpoint(tmp_path / "llada", **fields)
    dst = convert_llada_checkpoint(src, tmp_path / "out", max_shard_size="20KB", **overrides)
    assert (dst / SAFE_INDEX).is_file() and len(list(dst.glob("model-*.safetensors"))) > 1
    model = ElasticMDMForDiffusionLM.from_pretrained(dst).eval()
    c = model.config
    assert (c.block_type, c.vocab_size, c.intermediate_size, c.rope_theta) == ("llama", 64, 48, 500000.0)
    assert (c.mask_token_id, c.bos_token_id, c.eos_token_id, c.pad_token_id) == (60, 59, 61, 61)
    assert c.tie_word_embeddings == (variant == "tied") and c.adaln == (variant == "adaln-time")
    if c.adaln:  # zero-initialised by _init_weights: the block is LLaDA's whatever the noise level
        assert not any(p.any() for n, p in model.named_parameters() if "adaln" in n)
    reference = lambda ids: llada_reference_logits(state, config, ids)
    noise = torch.tensor([0.1, 0.5, 0.9])
    assert_logits_match(f"llada-{variant}", model, reference, sequences(60, 62), noise=noise)
    assert_copied(dst, state, LLADA, new={"gap_head.", "adaln.", "time_embed."})


def test_new_gap_head_is_initialised_by_init_weights(tmp_path: Path) -> None:
    """The gap head is drawn by `_init_weights` (normal(0, initializer_range), zero bias), reproducibly from `seed`."""
    src, _, _ = llada_checkpoint(tmp_path / "llada")
    heads = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = saved_tensors(convert_llada_checkpoint(src, tmp_path / name, seed=seed, max_gap=20))
        heads.append(out["gap_head.dense.weight"])
        assert out["gap_head.out_proj.weight"].shape == (21, 32)
        assert not out["gap_head.dense.bias"].any() and not out["gap_head.out_proj.bias"].any()
        assert 0.015 < out["gap_head.dense.weight"].std() < 0.025
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])


def test_bf16_source_stays_bf16_unless_overridden(tmp_path: Path) -> None:
    src, _, state = llada_checkpoint(tmp_path / "llada", dtype=torch.bfloat16)
    out = saved_tensors(convert_llada_checkpoint(src, tmp_path / "bf16"))
    assert {t.dtype for t in out.values()} == {torch.bfloat16}
    assert torch.equal(out["model.layers.2.mlp.gate_proj.weight"], state["model.transformer.blocks.2.ff_proj.weight"])
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert ElasticMDMForDiffusionLM.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16
    out = saved_tensors(convert_llada_checkpoint(src, tmp_path / "fp32", dtype="float32"))
    assert {t.dtype for t in out.values()} == {torch.float32}
    assert torch.equal(out["lm_head.weight"], state["model.transformer.ff_out.weight"].float())


def test_output_folder_has_the_save_pretrained_layout(tmp_path: Path) -> None:
    """Same non-weight files as `save_pretrained` (config, generation config, remote code); shards + index."""
    src, _, _ = llada_checkpoint(tmp_path / "llada")
    dst = convert_llada_checkpoint(src, tmp_path / "out", max_shard_size="20KB")
    model = ElasticMDMForDiffusionLM.from_pretrained(dst)
    model.save_pretrained(tmp_path / "reference")
    non_weights = lambda folder: {p.name for p in folder.iterdir() if "safetensors" not in p.name}
    assert non_weights(dst) == non_weights(tmp_path / "reference")
    ours, theirs = (json.loads((folder / "config.json").read_text()) for folder in (dst, tmp_path / "reference"))
    assert {k: v for k, v in ours.items() if k != "transformers_version"} == {
        k: v for k, v in theirs.items() if k != "transformers_version"
    }
    index = json.loads((dst / SAFE_INDEX).read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in saved_tensors(dst).values())


# ---------------------------------------------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------------------------------------------


def test_wrong_source_type_names_the_right_converter(tmp_path: Path) -> None:
    llada, _, _ = llada_checkpoint(tmp_path / "llada")
    mdlm, _, _ = mdlm_checkpoint(tmp_path / "mdlm")
    with pytest.raises(ValueError, match=r"is a checkpoint of LLaDA.*not of MDLM: use convert_llada_checkpoint"):
        convert_mdlm_checkpoint(llada, tmp_path / "x")
    with pytest.raises(ValueError, match=r"is a checkpoint of MDLM.*not of LLaDA: use convert_mdlm_checkpoint"):
        convert_llada_checkpoint(mdlm, tmp_path / "y")
    elastic = convert_llada_checkpoint(llada, tmp_path / "elastic")
    with pytest.raises(ValueError, match="already an Elastic-MDM checkpoint"):
        convert_llada_checkpoint(elastic, tmp_path / "z")
    bert = write_checkpoint(
        tmp_path / "bert", {"model_type": "bert"}, {"bert.embeddings.weight": torch.ones(2)}, "safetensors"
    )
    with pytest.raises(ValueError, match=r"is not a checkpoint of MDLM \(model_type='bert'"):
        convert_mdlm_checkpoint(bert, tmp_path / "w")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # nothing written on error


def test_missing_shard_is_named(tmp_path: Path) -> None:
    src, _, _ = llada_checkpoint(tmp_path / "llada")
    (src / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003.safetensors"):
        convert_llada_checkpoint(src, tmp_path / "out")


def test_shape_mismatch_names_key_and_shapes(tmp_path: Path) -> None:
    config = {**MDLM_CONFIG}
    state = mdlm_state(config)
    state["backbone.blocks.1.attn_out.weight"] = torch.zeros(32, 31)
    src = write_checkpoint(tmp_path / "mdlm", config, state, "safetensors")
    with pytest.raises(
        ValueError, match=r"backbone\.blocks\.1\.attn_out\.weight: source \(32, 31\), expected \(32, 32\)"
    ):
        convert_mdlm_checkpoint(src, tmp_path / "out")


@pytest.mark.parametrize("change", ["extra", "missing"])
def test_unknown_and_missing_keys_are_named(tmp_path: Path, change: str) -> None:
    state = mdlm_state()
    if change == "extra":
        state["backbone.blocks.0.attn_bias"] = torch.zeros(3)
        state["backbone.blocks.2.norm1.weight"] = torch.ones(32)  # a block the config does not have
        pattern = r"no place in the model.*backbone\.blocks\.0\.attn_bias.*backbone\.blocks\.2\.norm1"
    else:
        del state["backbone.blocks.1.mlp.2.bias"]
        pattern = r"needs are missing.*backbone\.blocks\.1\.mlp\.2\.bias \(-> model\.layers\.1\.mlp\.down_proj\.bias\)"
    src = write_checkpoint(tmp_path / "mdlm", MDLM_CONFIG, state, "safetensors")
    with pytest.raises(ValueError, match=pattern):
        convert_mdlm_checkpoint(src, tmp_path / "out")


def test_vocab_without_room_for_a_mask_token(tmp_path: Path) -> None:
    """GPT-2's 50257 tokens and no extra row: the mask would be EOS. LLaDA: a mask id beyond the embedding rows."""
    src, _, _ = mdlm_checkpoint(tmp_path / "mdlm", vocab_size=50257)
    with pytest.raises(ValueError, match="no room for a separate mask token"):
        convert_mdlm_checkpoint(src, tmp_path / "out")
    src, _, _ = llada_checkpoint(tmp_path / "llada", mask_token_id=126336)
    with pytest.raises(ValueError, match="mask_token_id=126336 has no row in the 64-token vocabulary"):
        convert_llada_checkpoint(src, tmp_path / "out")


def test_overrides_are_checked(tmp_path: Path) -> None:
    src, _, _ = mdlm_checkpoint(tmp_path / "mdlm")
    with pytest.raises(ValueError, match=r"Unknown override\(s\) \['max_gapp'\]"):
        convert_mdlm_checkpoint(src, tmp_path / "a", max_gapp=3)
    with pytest.raises(ValueError, match=r"fixed by the source weights.*hidden_size=64 \(the checkpoint has 32\)"):
        convert_mdlm_checkpoint(src, tmp_path / "b", hidden_size=64)
    dst = convert_mdlm_checkpoint(src, tmp_path / "c", max_gap=12, objective="elastic", time_conditioning=True)
    config = ElasticMDMConfig.from_pretrained(dst)
    assert (config.max_gap, config.objective, config.time_conditioning) == (12, "elastic", True)
    with pytest.raises(ValueError, match="not empty"):
        convert_mdlm_checkpoint(src, dst)
    convert_mdlm_checkpoint(src, dst, overwrite=True)


def test_unsupported_llada_options_are_rejected(tmp_path: Path) -> None:
    src, _, _ = llada_checkpoint(tmp_path / "llada", include_bias=True, n_kv_heads=2)
    with pytest.raises(ValueError, match=r"include_bias=True.*n_kv_heads=2"):
        convert_llada_checkpoint(src, tmp_path / "out")


def test_hub_ids_are_downloaded_with_allow_patterns(tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub

    src, _, _ = llada_checkpoint(tmp_path / "snapshot")
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: calls.append((repo, kw)) or str(src))
    convert_llada_checkpoint("GSAI-ML/LLaDA-8B-Base", tmp_path / "out", revision="main")
    repo, kwargs = calls[0]
    assert repo == "GSAI-ML/LLaDA-8B-Base" and kwargs["revision"] == "main"
    assert {"config.json", "*.safetensors", SAFE_INDEX, "tokenizer.json"} <= set(kwargs["allow_patterns"])
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a Hub repo"):
        convert_llada_checkpoint("no-such-org/no-such-model-xyz", tmp_path / "none")


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer, CLI, remote-code reload
# ---------------------------------------------------------------------------------------------------------------


def write_word_tokenizer(folder: Path, words: list[str], bos: str, eos: str) -> None:
    """A word-level fast tokenizer over `words` (ids in order) that declares BOS / EOS but no mask token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens({"bos_token": bos, "eos_token": eos})
    assert len(tokenizer) == len(words) and tokenizer.mask_token is None
    tokenizer.save_pretrained(folder)


def write_llada_tokenizer(folder: Path) -> None:
    """62 tokens with LLaDA's special tokens at the tiny config's ids; like LLaDA's tokenizer, `<|mdm_mask|>` is in
    the vocabulary but not declared as the mask token."""
    words = [f"w{i}" for i in range(59)] + ["<|startoftext|>", "<|mdm_mask|>", "<|endoftext|>"]
    write_word_tokenizer(folder, words, "<|startoftext|>", "<|endoftext|>")


def test_tokenizer_is_saved_with_its_mask_token(tmp_path: Path) -> None:
    """LLaDA: `<|mdm_mask|>` becomes the mask token. MDLM with a GPT-2-like tokenizer (50257 tokens, `<|endoftext|>`
    = 50256): `<|mask|>` is added as token 50257, MDLM's mask row. Both then pass train.py's `check_vocab`.
    A source tokenizer that does not load is copied unchanged."""
    from transformers import AutoTokenizer

    src, _, _ = llada_checkpoint(tmp_path / "llada")
    write_llada_tokenizer(src)
    dst = convert_llada_checkpoint(src, tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(dst)
    assert tokenizer.mask_token == "<|mdm_mask|>" and tokenizer.mask_token_id == 60
    check_vocab(ElasticMDMConfig.from_pretrained(dst), tokenizer)

    write_word_tokenizer(tmp_path / "gpt2", [f"g{i}" for i in range(50256)] + ["<|endoftext|>"], *["<|endoftext|>"] * 2)
    mdlm, _, _ = mdlm_checkpoint(tmp_path / "mdlm")
    dst = convert_mdlm_checkpoint(mdlm, tmp_path / "mdlm-out", tokenizer=tmp_path / "gpt2")
    tokenizer = AutoTokenizer.from_pretrained(dst)
    assert (tokenizer.mask_token, tokenizer.mask_token_id, tokenizer.eos_token_id) == ("<|mask|>", MDLM_MASK, GPT2_EOT)
    check_vocab(ElasticMDMConfig.from_pretrained(dst), tokenizer)

    (mdlm / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "NoSuchTokenizer"}))
    dst = convert_mdlm_checkpoint(mdlm, tmp_path / "copied")
    assert json.loads((dst / "tokenizer_config.json").read_text()) == {"tokenizer_class": "NoSuchTokenizer"}


def test_cli_scripts(tmp_path: Path, monkeypatch, capsys) -> None:
    src, _, _ = llada_checkpoint(tmp_path / "llada")
    argv = [
        "convert_llada.py",
        str(src),
        str(tmp_path / "out"),
        "--adaln",
        "true",
        "--max_gap=20",
        "--dtype",
        "bfloat16",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(REPO_ROOT / "scripts" / "convert_llada.py"), run_name="__main__")
    config = ElasticMDMConfig.from_pretrained(tmp_path / "out")
    assert config.adaln and config.max_gap == 20 and config.dtype == torch.bfloat16
    assert "Wrote the Elastic-MDM checkpoint" in capsys.readouterr().out
    mdlm, _, _ = mdlm_checkpoint(tmp_path / "mdlm")
    monkeypatch.setattr(sys, "argv", ["convert_mdlm.py", str(mdlm), str(tmp_path / "m"), "--objective", "elastic"])
    runpy.run_path(str(REPO_ROOT / "scripts" / "convert_mdlm.py"), run_name="__main__")
    assert ElasticMDMConfig.from_pretrained(tmp_path / "m").objective == "elastic"


REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys
    import torch
    from transformers import AutoModel, AutoTokenizer

    report = {"importable": importlib.util.find_spec("elastic_mdm") is not None}
    root = sys.argv[1]
    for name in sys.argv[2:]:
        model = AutoModel.from_pretrained(root + "/" + name, trust_remote_code=True).eval()
        ids, cu = torch.load(root + "/" + name + "_inputs.pt")
        with torch.no_grad():
            logits = model(ids, cu_seqlens=cu).logits
        out = model.generate(num_return_sequences=2, num_steps=4, seed=0, return_dict_in_generate=True)
        sequences, lengths = out.sequences, out.lengths
        torch.save({"logits": logits, "sequences": sequences, "lengths": lengths}, root + "/" + name + "_remote.pt")
        report[name] = type(model).__module__
    tokenizer = AutoTokenizer.from_pretrained(root + "/llada", trust_remote_code=True)
    report["mask_token"] = tokenizer.mask_token
    print("REPORT=" + json.dumps(report))
    """
)


def test_converted_folders_reload_with_remote_code_and_generate(tmp_path: Path, isolated_python) -> None:
    """A fresh interpreter where `elastic_mdm` is not importable loads both converted folders with
    `trust_remote_code=True`, reproduces the reference logits and samples."""
    llada, llada_config, llada_state = llada_checkpoint(tmp_path / "src-llada")
    write_llada_tokenizer(llada)
    mdlm, mdlm_config, mdlm_state_ = mdlm_checkpoint(tmp_path / "src-mdlm")
    convert_llada_checkpoint(llada, tmp_path / "llada", max_shard_size="20KB")
    convert_mdlm_checkpoint(mdlm, tmp_path / "mdlm")
    cases = {
        "llada": (sequences(60, 62, (7, 4)), lambda ids: llada_reference_logits(llada_state, llada_config, ids), 60),
        "mdlm": (
            sequences(MDLM_MASK, 50257, (5, 8)),
            lambda ids: mdlm_reference_logits(mdlm_state_, mdlm_config, ids),
            MDLM_MASK,
        ),
    }
    for name, (seqs, _, _) in cases.items():
        cu = torch.tensor([0, *torch.tensor([len(s) for s in seqs]).cumsum(0).tolist()], dtype=torch.int32)
        torch.save((torch.cat(seqs), cu), tmp_path / f"{name}_inputs.pt")
    result = isolated_python(REMOTE_SCRIPT, str(tmp_path), "llada", "mdlm")
    assert result.returncode == 0 and "REPORT=" in result.stdout, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("REPORT="))[7:])
    assert not report["importable"] and report["mask_token"] == "<|mdm_mask|>"
    for name, (seqs, reference, mask) in cases.items():
        assert report[name].startswith("transformers_modules."), report
        remote = torch.load(tmp_path / f"{name}_remote.pt")
        expected = torch.cat([reference(ids) for ids in seqs])
        keep = torch.arange(expected.shape[-1]) != mask
        torch.testing.assert_close(remote["logits"][:, keep], expected[:, keep], **LOGIT_TOL)
        sequences_, lengths = remote["sequences"], remote["lengths"]
        assert sequences_.shape[0] == 2 and lengths.shape == (2,) and (lengths >= 2).all()
        assert not any((row[:n] == mask).any() for row, n in zip(sequences_, lengths.tolist(), strict=True))


# ---------------------------------------------------------------------------------------------------------------
# Memory: peak RSS while converting a multi-shard checkpoint of a few hundred MB
# ---------------------------------------------------------------------------------------------------------------

RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from elastic_mdm.conversion.convert import convert_llada_checkpoint

    def status(field):  # kB -> bytes; VmHWM is the peak RSS of this process image (ru_maxrss would include the
        with open("/proc/self/status") as f:  # forked parent's RSS: Linux carries it over exec)
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    convert_llada_checkpoint(sys.argv[1], sys.argv[2], max_shard_size=sys.argv[3])
    print("RSS=" + json.dumps({"before": before, "peak": status("VmHWM")}))
    """
)
RSS_SLACK = 64 * 2**20  # interpreter noise, the new gap head, allocator rounding


def test_peak_memory_stays_near_one_source_shard_plus_one_output_shard(tmp_path: Path) -> None:
    """~270 MB fp32 LLaDA-layout checkpoint in 4 shards converted in a fresh process: the RSS increase stays below
    the largest source shard + the largest output shard + 64 MB (loading it all would take 270 MB more)."""
    fields = dict(
        d_model=512, n_heads=8, n_kv_heads=8, n_layers=8, mlp_hidden_size=2048, embedding_size=32768, vocab_size=32768
    )
    fields |= dict(mask_token_id=32000, bos_token_id=32001, eos_token_id=32002, pad_token_id=32002)
    config = {**LLADA_CONFIG, **fields}
    state = random_state(_llada_shapes(config), seed=2)
    src = write_checkpoint(tmp_path / "big", config, state, "sharded", shards=4)
    total = sum(t.numel() * t.element_size() for t in state.values())
    del state
    output_shard = 32 * 2**20
    result = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(src), str(tmp_path / "out"), str(output_shard)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rss = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("RSS="))[4:])
    largest_source = max(p.stat().st_size for p in src.glob("*.safetensors"))
    largest_output = max(p.stat().st_size for p in (tmp_path / "out").glob("*.safetensors"))
    increase = rss["peak"] - rss["before"]
    MAX_DIFFS["rss"] = increase / 2**20
    print(
        f"peak RSS increase {increase / 2**20:.0f} MiB; checkpoint {total / 2**20:.0f} MiB, largest source shard "
        f"{largest_source / 2**20:.0f} MiB, largest output shard {largest_output / 2**20:.0f} MiB"
    )
    assert increase < largest_source + largest_output + RSS_SLACK


# ---------------------------------------------------------------------------------------------------------------
# Real configs and the LoRA budget
# ---------------------------------------------------------------------------------------------------------------

MDLM_OWT_CONFIG = {  # kuleshov-group/mdlm-owt
    "model_type": "mdlm",
    "vocab_size": 50258,
    "model_length": 1024,
    "hidden_dim": 768,
    "cond_dim": 128,
    "n_blocks": 12,
    "n_heads": 12,
    "dropout": 0.1,
    "time_conditioning": False,
}
LLADA_8B_CONFIG = {  # GSAI-ML/LLaDA-8B-Base (no bos_token_id in the file)
    **{k: v for k, v in LLADA_CONFIG.items() if k != "bos_token_id"},
    **dict(d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32, mlp_hidden_size=12288, max_sequence_length=4096),
    **dict(embedding_size=126464, vocab_size=126464, mask_token_id=126336, eos_token_id=126081, pad_token_id=126081),
}


def test_real_config_fields_map_to_elastic_configs() -> None:
    mdlm = ElasticMDMConfig(**mdlm_config_kwargs(SimpleNamespace(config=MDLM_OWT_CONFIG, tensors={})))
    assert (mdlm.hidden_size, mdlm.num_hidden_layers, mdlm.num_attention_heads, mdlm.intermediate_size) == (
        768,
        12,
        12,
        3072,
    )
    assert (mdlm.cond_dim, mdlm.max_position_embeddings, mdlm.vocab_size, mdlm.mask_token_id) == (
        128,
        1024,
        50258,
        50257,
    )
    assert (mdlm.bos_token_id, mdlm.eos_token_id, mdlm.time_conditioning) == (50256, 50256, False)
    hydra = {
        "model_type": "mdlm",
        "backbone": "dit",
        "model": {"hidden_size": 768, "cond_dim": 128, "length": 1024, "n_blocks": 12, "n_heads": 12},
    }
    embedding = SimpleNamespace(shape=(50258, 768))
    nested = mdlm_config_kwargs(SimpleNamespace(config=hydra, tensors={"backbone.vocab_embed.embedding": embedding}))
    assert nested == mdlm_config_kwargs(SimpleNamespace(config=MDLM_OWT_CONFIG, tensors={}))
    llada = ElasticMDMConfig(**llada_config_kwargs(SimpleNamespace(config=LLADA_8B_CONFIG, tensors={})))
    assert (llada.hidden_size, llada.num_hidden_layers, llada.num_attention_heads, llada.intermediate_size) == (
        4096,
        32,
        32,
        12288,
    )
    assert (llada.vocab_size, llada.rope_theta, llada.norm_eps, llada.max_position_embeddings) == (
        126464,
        5e5,
        1e-5,
        4096,
    )
    assert (llada.mask_token_id, llada.bos_token_id, llada.eos_token_id) == (126336, 126080, 126081)
    assert not llada.tie_word_embeddings and not llada.mlp_bias and not llada.head_bias


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NEW_MODULES = ["gap_head", "adaln", "final_adaln", "time_embed"]


def test_lora_parameter_count_matches_peft() -> None:
    peft = pytest.importorskip("peft")
    config = ElasticMDMConfig(
        **{**llada_config_kwargs(SimpleNamespace(config=LLADA_CONFIG, tensors={})), "adaln": True}
    )
    model = ElasticMDMForDiffusionLM(config)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=LORA_TARGETS, modules_to_save=NEW_MODULES))
    trainable, _ = wrapped.get_nb_trainable_parameters()
    count = lora_parameter_count(config, 4, LORA_TARGETS, NEW_MODULES)
    assert count["trainable"] == trainable
    assert count["total"] == sum(p.numel() for p in ElasticMDMForDiffusionLM(config).parameters())


@pytest.mark.parametrize("adaln", [False, True])
def test_lora_parameter_count_llada_8b(adaln: bool) -> None:
    """LLaDA-8B retrofit, LoRA r = 16 on the 7 block linears, the gap head (and adaLN) trained in full."""
    kwargs = llada_config_kwargs(SimpleNamespace(config=LLADA_8B_CONFIG, tensors={}))
    config = ElasticMDMConfig(**{**kwargs, "adaln": adaln})
    count = lora_parameter_count(config, 16, LORA_TARGETS, NEW_MODULES)
    d, f, layers, r, gaps = 4096, 12288, 32, 16, 4096 + 1
    lora = layers * r * (4 * (d + d) + 2 * (d + f) + (f + d))
    gap_head = (2 * d * d + d) + (d * gaps + gaps)
    adaln_params = layers * (128 * 6 * d + 6 * d) + (128 * 2 * d + 2 * d) + (256 * 128 + 128 + 128 * 128 + 128)
    assert count["lora"] == lora == 41_943_040
    assert count["modules_to_save"] == gap_head + (adaln_params if adaln else 0)
    assert gap_head == 50_343_937 and adaln_params == 102_555_904
    MAX_DIFFS[f"lora-adaln={adaln}"] = count["trainable"]

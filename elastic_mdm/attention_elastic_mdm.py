"""Attention backends over a packed stream (`q`, `k`, `v` `[tokens, heads, head_dim]`, `PackedSequences` bounds).

`ATTENTION_FUNCTIONS` maps the config's `attn_implementation` to one: `eager` (fp32 reference), `sdpa` (padded with a
key-padding mask; CPU and any dtype), `varlen_attn` (torch >= 2.10 on CUDA), `flash_attention_2` (flash-attn), and the
flash kernels Transformers loads itself (`flash_attention_3`, the Hub kernels it substitutes when flash-attn is absent);
`attention_function` refuses any other name. Attention is bidirectional and never crosses a sequence boundary
(docs/design.md §2).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from .packing import PackedSequences

try:  # optional fast path: pip install flash-attn
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None

try:  # torch >= 2.10 on CUDA
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - depends on torch
    varlen_attn = None

VARLEN_ATTN = "varlen_attn"  # attn_implementation name of torch.nn.attention.varlen.varlen_attn


def without_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """A context that turns autocast off on `device` (a no-op where autocast does not exist, e.g. `meta`)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _padded_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedSequences, eager: bool
) -> torch.Tensor:
    """Pad each sequence to `max_seqlen`, attend with a key-padding mask, unpad. Portable (CPU, any dtype)."""
    batch, length, (_, heads, dim) = packed.batch_size, packed.max_seqlen, q.shape
    index = packed.padded_index()  # [tokens]

    def to_padded(x: torch.Tensor) -> torch.Tensor:  # [tokens, H, D] -> [B, H, L, D]
        out = x.new_zeros(batch * length, heads, dim).index_copy(0, index, x)
        return out.view(batch, length, heads, dim).transpose(1, 2)

    valid = torch.arange(length, device=q.device) < packed.lengths[:, None]  # [B, L]
    key_mask = valid[:, None, None, :]  # [B, 1, 1, L]
    qp, kp, vp = to_padded(q), to_padded(k), to_padded(v)
    if eager:
        with without_autocast(q.device):  # the fp32 reference stays fp32 under bf16 autocast
            scores = (qp.float() @ kp.float().transpose(-1, -2)) / math.sqrt(dim)  # [B, H, L, L]
            scores = scores.masked_fill(~key_mask, float("-inf"))
            out = (scores.softmax(-1) @ vp.float()).to(q.dtype)
    else:
        out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=key_mask)
    return out.transpose(1, 2).reshape(batch * length, heads, dim)[index]


def half_precision(kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Run a flash kernel (fp16/bf16 only) on bf16 copies of fp32 inputs and cast the output back."""
    if q.dtype in (torch.float16, torch.bfloat16):
        return kernel(q, k, v, *args, **kwargs)
    return kernel(q.bfloat16(), k.bfloat16(), v.bfloat16(), *args, **kwargs).to(q.dtype)


def eager_attention(q, k, v, packed: PackedSequences) -> torch.Tensor:
    """Reference attention, softmax(q kᵀ / √d) v in fp32 per sequence."""
    return _padded_attention(q, k, v, packed, eager=True)


def sdpa_attention(q, k, v, packed: PackedSequences) -> torch.Tensor:
    """`F.scaled_dot_product_attention` on the padded layout with a key-padding mask."""
    return _padded_attention(q, k, v, packed, eager=False)


def torch_varlen_attention(q, k, v, packed: PackedSequences) -> torch.Tensor:
    """`torch.nn.attention.varlen.varlen_attn` (CUDA, torch >= 2.10): no padding, bidirectional window."""
    if varlen_attn is None or not q.is_cuda:
        raise RuntimeError(
            f"attn_implementation='{VARLEN_ATTN}' needs torch >= 2.10 and CUDA tensors (got device {q.device}); "
            "use attn_implementation='sdpa' on CPU."
        )
    cu = packed.cu_seqlens
    return half_precision(varlen_attn, q, k, v, cu, cu, packed.max_seqlen, packed.max_seqlen)


def flash_attention_2(q, k, v, packed: PackedSequences) -> torch.Tensor:
    """`flash_attn.flash_attn_varlen_func` (pip install flash-attn), non-causal."""
    if flash_attn_varlen_func is None:
        raise ImportError(
            "attn_implementation='flash_attention_2' needs the flash-attn package: pip install flash-attn."
        )
    cu, length = packed.cu_seqlens, packed.max_seqlen
    return half_precision(flash_attn_varlen_func, q, k, v, cu, cu, length, length, causal=False)


# What Transformers resolves a flash request to when it loads the kernel itself: `flash_attention_3` (the
# flash_attn_interface package) and, with flash-attn absent and `kernels` installed (Transformers >= 5.24), the Hub
# kernels it substitutes for `flash_attention_2` / `flash_attention_3`. Each exposes a varlen function.
TRANSFORMERS_FLASH_KERNELS = (
    "flash_attention_3",
    "kernels-community/flash-attn2",
    "kernels-community/flash-attn3",
    "kernels-community/vllm-flash-attn3",
)


def transformers_flash_attention(name: str):
    """Packed attention through the varlen function Transformers loads for `name` (a flash package or Hub kernel)."""

    def attention(q, k, v, packed: PackedSequences) -> torch.Tensor:
        from transformers.modeling_flash_attention_utils import lazy_import_flash_attention

        (_, varlen, *_), _ = lazy_import_flash_attention(name)

        def output_only(*args, **kwargs) -> torch.Tensor:  # some kernels return (out, softmax_lse)
            out = varlen(*args, **kwargs)
            return out[0] if isinstance(out, tuple) else out

        cu, length = packed.cu_seqlens, packed.max_seqlen
        kwargs = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=length, max_seqlen_k=length, causal=False)
        return half_precision(output_only, q, k, v, **kwargs)

    return attention


ATTENTION_FUNCTIONS = {
    "eager": eager_attention,
    "sdpa": sdpa_attention,
    VARLEN_ATTN: torch_varlen_attention,
    "flash_attention_2": flash_attention_2,
    **{name: transformers_flash_attention(name) for name in TRANSFORMERS_FLASH_KERNELS},
}


def attention_function(name: str | None):
    """The packed attention of `attn_implementation` `name` (None: `sdpa`); any other name is refused."""
    function = ATTENTION_FUNCTIONS.get(name or "sdpa")
    if function is None:
        raise ValueError(
            f"attn_implementation={name!r} has no packed (varlen) kernel in Elastic-MDM; choose one of "
            f"{sorted(ATTENTION_FUNCTIONS)} (flash_attention_2 needs `pip install flash-attn`, or the `kernels` "
            "package, with which Transformers loads kernels-community/flash-attn2)."
        )
    return function


def _register_varlen_attn_name() -> None:
    """Make `attn_implementation="varlen_attn"` a name Transformers accepts (it validates against its registry)."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def hf_varlen_attention(module, query, key, value, attention_mask, cu_seq_lens_q=None, max_length_q=None, **kwargs):
        # Transformers' convention: [1, heads, tokens, dim] with cu_seq_lens kwargs
        packed = PackedSequences.from_cu_seqlens(cu_seq_lens_q, max_length_q)
        out = torch_varlen_attention(*(x[0].transpose(0, 1) for x in (query, key, value)), packed)
        return out[None], None

    if VARLEN_ATTN not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        AttentionInterface.register(VARLEN_ATTN, hf_varlen_attention)


_register_varlen_attn_name()


__all__ = ["ATTENTION_FUNCTIONS", "VARLEN_ATTN", "attention_function"]

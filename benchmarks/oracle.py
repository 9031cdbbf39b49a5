"""Random-weight models of a requested size and the oracle denoiser that gives them real data trajectories.

Oracle mode: a random-weight model whose token fills and gap counts are replaced by those of the exact forward
process of clean sequences of given lengths (`OracleDenoiser`); the backbone and both heads still run on every pass,
so the time is the real one while the Elastic trajectory has the active lengths of real data at every step
(`Binomial(n, F(k))` interior tokens at step k) without a trained model.
"""

from __future__ import annotations

import torch

from elastic_mdm.configuration_elastic_mdm import ElasticMDMConfig
from elastic_mdm.modeling_elastic_mdm import ElasticMDMForDiffusionLM
from elastic_mdm.packing_elastic_mdm import PackedSequences

from .counting import uncounted


def oracle_config(
    hidden_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    vocab_size: int,
    length: int,
    block_type: str = "dit",
    intermediate_size: int | None = None,
) -> ElasticMDMConfig:
    """A config of the requested size for sequences of at most `length` tokens: mask = `V - 1`, BOS = EOS = `V - 2`
    (GPT-2 style), gap classes `0..length`. The oracle writes position indices as tokens, so `V > length + 2`."""
    if vocab_size < length + 3:
        raise ValueError(f"The oracle needs vocab_size >= length + 3 = {length + 3} (tokens are positions).")
    return ElasticMDMConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=length,
        block_type=block_type,
        mask_token_id=vocab_size - 1,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 2,
    )


def random_model(
    config: ElasticMDMConfig, device: str | torch.device = "cpu", seed: int = 0
) -> ElasticMDMForDiffusionLM:
    """A randomly initialised model in eval mode (fp32 weights; `--dtype bf16` runs it under autocast)."""
    torch.manual_seed(seed)
    return ElasticMDMForDiffusionLM(config).to(device).eval()


def compile_backbone(model: ElasticMDMForDiffusionLM, mode: str | None = None) -> ElasticMDMForDiffusionLM:
    """`torch.compile` the packed backbone forward with dynamic shapes (packed lengths change every step). Static
    shapes and CUDA graphs come from `--cuda_graphs` (`cuda_graphs_elastic_mdm.CUDAGraphDenoiser`, which captures the
    compiled kernels too), so `mode` should be one without graphs (default, `max-autotune-no-cudagraphs`)."""
    if mode not in (None, "default", "max-autotune-no-cudagraphs"):
        raise ValueError(
            f"compile mode {mode!r} captures CUDA graphs of its own; use --cuda_graphs with the default mode or "
            "'max-autotune-no-cudagraphs' instead."
        )
    model.model.forward_packed = torch.compile(model.model.forward_packed, dynamic=True, mode=mode)
    return model


class OracleDenoiser:
    """Runs the real backbone and heads (so the time is real) but answers with the exact forward process.

    Tokens are positions: an active token's id is its index in `x0 = (BOS, y_1..y_n, EOS)` (BOS = 0, EOS = n + 1),
    so a packed sequence carries its own length in its last token and nothing else is stored. A run of masks after
    the known token at position `p` is given positions `p + 1, p + 2, ...` (the sampler draws how many masks a gap
    gets, not which positions: any choice gives the same active-length law). Features are the backbone's `h` with
    the true position appended as a last fp32 column; the token head returns all mass on the position and the gap
    head on `position(b) - position(a) - 1`.
    """

    def __init__(self, model: ElasticMDMForDiffusionLM):
        self.model = model
        self.mask_token_id = model.config.mask_token_id

    def diffusion_features(self, input_ids: torch.Tensor, packed: PackedSequences, noise_level: torch.Tensor):
        hidden = self.model.diffusion_features(input_ids, packed, noise_level)
        rows = torch.arange(input_ids.numel(), device=input_ids.device)
        known = input_ids != self.mask_token_id  # every sequence starts with a known BOS
        last_known = torch.where(known, rows, torch.zeros_like(rows)).cummax(0).values
        position = input_ids[last_known] + (rows - last_known)
        return torch.cat([hidden.float(), position.float()[:, None]], dim=-1)

    def _backbone(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden[:, :-1].to(self.model.dtype)

    @staticmethod
    def _one_hot_logits(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.full_like(logits, float("-inf")).scatter_(-1, target[:, None], 0.0)

    def token_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.token_logits(self._backbone(hidden))
        with uncounted():  # the oracle's answer is not a sampler's op (a trained model's head stops at `logits`)
            return self._one_hot_logits(logits, hidden[:, -1].long())

    def gap_logits(self, hidden: torch.Tensor, left: torch.Tensor, noise_level: float) -> torch.Tensor:
        logits = self.model.gap_logits(self._backbone(hidden), left, noise_level)
        with uncounted():
            gap = (hidden[left + 1, -1] - hidden[left, -1] - 1).long()
            return self._one_hot_logits(logits, gap)

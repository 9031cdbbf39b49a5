"""The generation config of Elastic-MDM (`ElasticMDMGenerationConfig`), saved as `generation_config.json`.

It follows Transformers' `GenerationConfig`: `validate()` runs when a config is built and at every `update()` and
refuses what the samplers cannot honour (Transformers fields without a diffusion meaning, bad step counts,
non-finite numbers, ...); `update(**kwargs)` returns the entries that name no field.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    NoBadWordsLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .schedules_elastic_mdm import RevealSchedule, check_num_steps, get_schedule

# Transformers generation fields the samplers honour; any other field set to a non-neutral value is refused.
SUPPORTED_HF_FIELDS = {
    "do_sample", "temperature", "top_k", "top_p", "use_cache", "max_length", "max_new_tokens",
    "num_return_sequences", "return_dict_in_generate", "bos_token_id", "eos_token_id", "pad_token_id",
    "suppress_tokens", "bad_words_ids", "_from_model_config", "transformers_version",
}  # fmt: skip
NEUTRAL_HF_VALUES = {
    "num_beams": 1, "num_beam_groups": 1, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "min_length": 0, "min_new_tokens": 0,
    "length_penalty": 1.0, "typical_p": 1.0, "diversity_penalty": 0.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    "output_attentions": False, "output_hidden_states": False, "output_scores": False, "output_logits": False,
    "renormalize_logits": False, "remove_invalid_values": False, "low_memory": False, "early_stopping": False,
}  # fmt: skip
HF_FIELDS = frozenset(vars(GenerationConfig()))
UNSUPPORTED_REASONS = {
    "num_beams": "there is no beam search: every token is drawn in parallel; use num_return_sequences for several "
    "samples",
    "repetition_penalty": "it penalises tokens generated before, which needs a left-to-right order the diffusion "
    "sampler does not have",
    "no_repeat_ngram_size": "n-gram bans need a left-to-right order the diffusion sampler does not have",
    "min_length": "lengths come from the gap head and cannot be forced up without biasing them; filter the samples "
    "by length instead",
    "min_new_tokens": "lengths come from the gap head and cannot be forced up without biasing them; filter the "
    "samples by length instead",
}


class ElasticMDMGenerationConfig(GenerationConfig):
    """Generation settings of Elastic-MDM, saved with the model as `generation_config.json`.

    Args:
        num_steps: Number of reverse steps `K` (`K + 1` denoiser passes at most, fewer with caching).
        schedule: Reveal schedule name (`linear`, `cosine`, `exponential`, `p-linear`, `clipped`).
        schedule_kwargs: Its parameters (`sigma`, `p`, `beta`, `omega`).
        gap_temperature: Temperature of the gap-count distribution.
        gap_do_sample: Sample gap counts (`True`) or take the most likely count (`False`).
        lock_length: Keep the length the gap head draws at step 0 (the length model) and let later steps only
            place the remaining positions (`length_lock_elastic_mdm.py`; one more device read per step). `False`
            (default) is the paper's sampler, which re-draws every gap's count at every step. Both are exact with an
            oracle model.
            `scripts/train.py` saves `True` with the checkpoints it trains (`--lock_length`, chosen by the
            length-fidelity ablation of docs/quality.md).
        use_cache: Reuse a sequence's last pass when its input did not change (no fill, no insertion) and the model
            is not time-conditioned, as MDLM's `ddpm_cache`.
        output_trajectory: Return the active sequence of every step (`return_dict_in_generate=True`).
        progress_bar: Show a tqdm bar over the steps.
        max_length: Safety cap on the total length of a sequence, anchors included (default: the model's
            `max_position_embeddings`). Sequences that reach it are flagged in `hit_max_length`. For
            `objective="mdlm"` models it is the canvas length `L`.
        mdlm_gap_budget: `objective="mdlm"` with `template_ids` only: the fixed number of placeholder masks each
            open gap of a template gets (the paper's §5.4 MDLM baseline). Pad / EOS tokens the model writes inside a
            gap are dropped from the result: they are how MDLM writes a value shorter than the budget.
        cuda_graphs: Replay every denoiser pass from a CUDA graph captured per static shape bucket
            (`cuda_graphs_elastic_mdm.CUDAGraphDenoiser`; the model must be on a CUDA device). Removes the per-pass
            launch overhead that dominates short passes (docs/design.md §8); the first call of each bucket captures its
            graph.
        do_sample, temperature, top_k, top_p: Token sampling, as in Transformers.
        max_new_tokens: How many tokens each input (prompt, template or the unconditional `BOS EOS`) may grow by;
            a sequence that reaches it is flagged in `hit_max_length`. Combines with `max_length` (the smaller
            cap wins).
        suppress_tokens, bad_words_ids: Tokens never sampled (Transformers' `SuppressTokensLogitsProcessor` and
            `NoBadWordsLogitsProcessor`); `bad_words_ids` holds single tokens only (`[[id], ...]`).

    Other Transformers fields (`num_beams`, `repetition_penalty`, `no_repeat_ngram_size`, `min_new_tokens`,
    `min_length`, ...) have no meaning for a diffusion sampler: `generate()` refuses them instead of ignoring them.
    `num_steps` is at most `schedules.MAX_NUM_STEPS`.

    `gap_temperature` and `gap_do_sample` only concern `objective="elastic"` models (MDLM has no gap head).
    """

    def __init__(
        self,
        num_steps: int = 128,
        schedule: str = "linear",
        schedule_kwargs: dict | None = None,
        gap_temperature: float = 1.0,
        gap_do_sample: bool = True,
        lock_length: bool = False,
        output_trajectory: bool = False,
        progress_bar: bool = False,
        mdlm_gap_budget: int | None = None,
        cuda_graphs: bool = False,
        **kwargs,
    ):
        self.num_steps = num_steps
        self.schedule = schedule
        self.schedule_kwargs = dict(schedule_kwargs or {})
        self.gap_temperature = gap_temperature
        self.gap_do_sample = gap_do_sample
        self.lock_length = lock_length
        self.output_trajectory = output_trajectory
        self.progress_bar = progress_bar
        self.mdlm_gap_budget = mdlm_gap_budget
        self.cuda_graphs = cuda_graphs
        kwargs.setdefault("do_sample", True)
        kwargs.setdefault("use_cache", True)
        super().__init__(**kwargs)

    @classmethod
    def from_model_config(cls, model_config) -> ElasticMDMGenerationConfig:
        """Defaults plus the special ids of the model config."""
        ids = ("bos_token_id", "eos_token_id", "pad_token_id")
        return cls(**{name: getattr(model_config, name, None) for name in ids})

    def reveal_schedule(self) -> RevealSchedule:
        """The reveal schedule `F` named by `schedule`, with `schedule_kwargs`."""
        return get_schedule(self.schedule, **self.schedule_kwargs)

    def token_processors(self, device: torch.device | str = "cpu") -> LogitsProcessorList:
        """Transformers' logits processors: `suppress_tokens` and single-token `bad_words_ids` (banned tokens), then
        the temperature, top-k and top-p warpers, in that order; their id tensors on `device` (the logits')."""
        processors = LogitsProcessorList()
        if self.suppress_tokens:
            processors.append(SuppressTokensLogitsProcessor(self.suppress_tokens, device=device))
        if self.bad_words_ids:
            processors.append(NoBadWordsLogitsProcessor(self.bad_words_ids))
        if self.temperature is not None and self.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k:
            processors.append(TopKLogitsWarper(self.top_k))
        if self.top_p is not None and self.top_p < 1.0:
            processors.append(TopPLogitsWarper(self.top_p))
        return processors

    def update(self, defaults_only: bool = False, allow_custom_entries: bool = False, **kwargs) -> dict[str, Any]:
        """Transformers' `update`: set the fields named in `kwargs`, `validate()`, and return the entries that name no
        field (only the config's fields count: a method or class attribute name is returned, never set)."""
        if allow_custom_entries:
            return super().update(defaults_only, allow_custom_entries, **kwargs)
        fields = {name: value for name, value in kwargs.items() if name in vars(self)}
        unused = super().update(defaults_only, **fields)
        return {**unused, **{name: value for name, value in kwargs.items() if name not in fields}}

    def validate(self, strict: bool = False, user_set_attributes: set[str] | None = None) -> None:
        """Transformers' checks, then refuse settings the samplers cannot honour or that would fail deep inside,
        silently do nothing, or turn every sample into NaN: Transformers fields without a diffusion meaning, step
        counts, non-finite numbers, multi-token bad words, an unknown schedule, a bad `mdlm_gap_budget`."""
        # Transformers refuses num_return_sequences > 1 with greedy tokens (a beam-search rule); here gap counts stay
        # random, so the copies differ: keep it out of Transformers' checks.
        self._check_sampler_fields()  # first: these messages say what the samplers need
        copies, self.num_return_sequences = self.num_return_sequences, 1
        try:
            super().validate(strict=strict, user_set_attributes=user_set_attributes)
        finally:
            self.num_return_sequences = copies
        self._check_transformers_fields()
        self.reveal_schedule()  # unknown schedule / bad parameters raise here
        budget = self.mdlm_gap_budget
        if budget is not None and not is_count(budget, 1):
            raise ValueError(f"mdlm_gap_budget must be an integer >= 1 (masks per open gap), got {budget!r}.")

    def check_token_ids(self, vocab_size: int) -> None:
        """Refuse `suppress_tokens` / `bad_words_ids` entries outside a model's vocabulary `0 .. vocab_size - 1`."""
        for name in ("suppress_tokens", "bad_words_ids"):
            tokens = getattr(self, name) or []
            flat = [t for entry in tokens for t in (entry if isinstance(entry, (list, tuple)) else [entry])]
            if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size for t in flat):
                raise ValueError(f"{name} must hold token ids in 0..{vocab_size - 1}, got {tokens!r}.")

    def _check_sampler_fields(self) -> None:
        count = self.num_return_sequences
        if count is not None and not is_count(count, 1):  # None: one sample per input
            raise ValueError(f"num_return_sequences must be an integer >= 1, got {count!r}.")
        check_num_steps(self.num_steps)
        floats = {"gap_temperature": self.gap_temperature, "temperature": self.temperature, "top_p": self.top_p}
        floats.update({f"schedule_kwargs[{k!r}]": v for k, v in self.schedule_kwargs.items()})
        for name, value in floats.items():
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}.")
        positive = {"gap_temperature": self.gap_temperature, "temperature": self.temperature}
        for name, value in positive.items():
            if value is not None and value <= 0:
                raise ValueError(
                    f"{name} must be > 0, got {value}; for the most likely tokens pass do_sample=False "
                    "(gap counts: gap_do_sample=False)."
                )
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1] (the probability mass kept; 1 keeps all), got {self.top_p}.")
        if self.top_k is not None and not is_count(self.top_k, 0):
            raise ValueError(f"top_k must be an integer >= 0 (0 keeps every token), got {self.top_k!r}.")
        if self.max_length is not None and not is_count(self.max_length, 2):
            raise ValueError(
                f"max_length must be an integer >= 2 (the longest sequence, BOS and EOS included), got "
                f"{self.max_length!r}."
            )
        new = self.max_new_tokens
        if new is not None and not is_count(new, 1):
            raise ValueError(
                f"max_new_tokens must be an integer >= 1 (how many tokens an input may grow by), got {new!r}; leave "
                "it unset for no cap but max_length."
            )

    def _check_transformers_fields(self) -> None:
        for name, value in vars(self).items():
            if name not in HF_FIELDS or name in SUPPORTED_HF_FIELDS or value is None:
                continue
            if name in NEUTRAL_HF_VALUES and value == NEUTRAL_HF_VALUES[name]:
                continue
            reason = UNSUPPORTED_REASONS.get(name, "the diffusion samplers have no equivalent")
            raise ValueError(f"generate() does not support {name}={value!r}: {reason}. Leave it unset.")
        words = self.bad_words_ids or []
        long_words = [word for word in words if not isinstance(word, (list, tuple)) or len(word) != 1]
        if long_words:
            raise ValueError(
                f"bad_words_ids may only hold single tokens ([[id], ...]): a multi-token word {long_words[0]!r} has "
                "no left context to match against in a diffusion sampler. Ban its tokens one by one, or use "
                "suppress_tokens."
            )


def is_count(value: object, least: int) -> bool:
    """Whether `value` is an integer (not a bool) `>= least`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


__all__ = ["ElasticMDMGenerationConfig"]

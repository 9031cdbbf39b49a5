"""`generate()` for Elastic-MDM models (`ElasticMDMGenerationMixin`).

`generate()` resolves its `ElasticMDMGenerationConfig` (`generation_config_elastic_mdm.py`), parses its inputs into a
packed start state (`sampling_state_elastic_mdm.ActiveState`), builds the `SamplerOptions` both samplers share once,
and runs the sampler of the checkpoint's `objective`: `sample_elastic` (`sampler_elastic_mdm.py`, variable lengths,
docs/design.md §3) or MDLM's fixed-canvas `sample_mdlm` (`sampler_mdlm_elastic_mdm.py`). Streaming:
`streaming_elastic_mdm.py`.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

from .cuda_graphs_elastic_mdm import CUDAGraphDenoiser, model_graph_denoiser
from .generation_config_elastic_mdm import ElasticMDMGenerationConfig
from .sampler_elastic_mdm import sample_elastic
from .sampler_loop_elastic_mdm import ElasticMDMGenerateOutput, SamplerOptions, tokens_per_forward
from .sampler_mdlm_elastic_mdm import sample_mdlm
from .sampling_state_elastic_mdm import ActiveState
from .streaming_elastic_mdm import DraftStream, ends_stream


def check_generator_device(generator: torch.Generator | None, device: torch.device) -> None:
    """Every draw runs on the model's device, so a `generator` must live there (a CPU generator cannot drive a CUDA
    draw)."""
    if generator is None:
        return
    where = generator.device
    if where.type != device.type or None not in (where.index, device.index) and where.index != device.index:
        raise ValueError(
            f"generator is on {where} but the model is on {device}: pass torch.Generator(device={str(device)!r})"
            ".manual_seed(...), or seed=..., which builds one on the model's device."
        )


class ElasticMDMGenerationMixin:
    """Adds `generate()` to `ElasticMDMForDiffusionLM`: variable-length Elastic-MDM sampling, or MDLM's fixed-canvas
    sampler for checkpoints trained with `objective="mdlm"`."""

    def diffusion_features(self, input_ids: torch.Tensor, packed, noise_level: torch.Tensor) -> torch.Tensor:
        return self.model.forward_packed(input_ids, packed, noise_level)

    def adjust_generation_fn(
        self, generation_config, from_auto_class, from_pipeline, pretrained_model_name_or_path, **kwargs
    ) -> None:
        """Called by `from_pretrained`: load `generation_config.json` as an `ElasticMDMGenerationConfig`."""
        if generation_config is not None:
            self.generation_config = ElasticMDMGenerationConfig.from_dict(generation_config.to_dict())
            return
        if pretrained_model_name_or_path is None:
            return
        loading = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")
        try:
            self.generation_config = ElasticMDMGenerationConfig.from_pretrained(
                pretrained_model_name_or_path, **{k: kwargs[k] for k in loading if k in kwargs}
            )
        except OSError:  # no generation_config.json: keep the defaults built from the model config
            pass

    @ends_stream
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | list[list[int]] | None = None,
        attention_mask: torch.Tensor | None = None,
        template_ids: torch.Tensor | list[list[int]] | None = None,
        generation_config: GenerationConfig | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        return_dict_in_generate: bool | None = None,
        streamer: BaseStreamer | None = None,
        **kwargs,
    ) -> torch.LongTensor | ElasticMDMGenerateOutput:
        r"""Sample sequences with the sampler of the checkpoint's `config.objective`.

        `"elastic"`: `sample_elastic`, variable lengths (docs/design.md §3). `"mdlm"`: `sample_mdlm`, MDLM's ancestral
        sampler on a canvas of `max_length` tokens, through the same packing, step cache and token sampling; a
        sequence ends at its first generated EOS.

        Inputs (at most one of them):
            * nothing: `num_return_sequences` unconditional samples, starting from `BOS EOS`;
            * `input_ids` (+ `attention_mask`, or a list of lists): prompts `BOS p_1 .. p_m` (no EOS); each is
              continued in one open gap before an appended EOS;
            * `template_ids`: `BOS .. EOS` templates in which every `mask_token_id` marks an open gap (infilling,
              JSON skeletons); the markers are removed and only those gaps grow. MDLM has no growing gaps: it needs
              `mdlm_gap_budget`, the number of masks each open gap gets (pad / EOS written in a gap are dropped).

        Every field of `ElasticMDMGenerationConfig` can be passed as a keyword (`num_steps`, `schedule`,
        `temperature`, `top_k`, `top_p`, `gap_temperature`, `max_length`, `max_new_tokens`, `suppress_tokens`,
        `bad_words_ids`, `num_return_sequences`, ...); Transformers fields without a diffusion meaning raise.
        `generator` (or `seed`) drives every random draw.

        `streamer` (any Transformers `BaseStreamer`, e.g. `TextStreamer` or `TextDiffusionStreamer`) follows the
        run as DiffusionGemma's `generate` feeds it (see `DraftStream`): `put(prefix)` first (each input up to its
        first open gap: the prompt, `BOS` alone, or a template's head), `put_draft(draft)` at every step that runs a
        pass when the streamer has `put_draft`, `put(rest)` with the final tokens after the prefix, then `end()`.
        Streaming reads each draft back from the device; the random draws, and so the samples, do not change.

        Returns the token ids `[batch, longest]` (`BOS .. EOS`, anchors included) padded with `pad_token_id` (EOS if
        unset), as every Transformers `generate`; with `return_dict_in_generate=True` an `ElasticMDMGenerateOutput`
        that adds the true `lengths`, `hit_max_length`, `num_passes`, `tokens_processed`, `sequence_passes`,
        `tokens_per_forward` (generated tokens per denoiser pass, see `tokens_per_forward()`) and the trajectory.

        Example (an untrained model: the samples are noise, their layout is not):

        >>> import torch
        >>> from elastic_mdm import ElasticMDMConfig, ElasticMDMForDiffusionLM
        >>> config = ElasticMDMConfig(vocab_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...     max_position_embeddings=24, mask_token_id=15, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        >>> model = ElasticMDMForDiffusionLM(config).eval()
        >>> out = model.generate(num_return_sequences=3, num_steps=8, seed=0, return_dict_in_generate=True)
        >>> type(out).__name__, out.sequences.shape[0], out.sequences.shape[1] == int(out.lengths.max())
        ('ElasticMDMGenerateOutput', 3, True)
        >>> ends = out.sequences[torch.arange(3), out.lengths - 1]  # every sample is BOS .. EOS, within the cap
        >>> bool((out.sequences[:, 0] == 1).all() and (ends == 2).all() and (out.lengths <= 24).all())
        True
        >>> filled = model.generate(template_ids=[[1, 5, 15, 6, 2]], num_steps=4, seed=0)  # grow at the mask only
        >>> filled[0, :2].tolist(), filled[0, -2:].tolist()
        ([1, 5], [6, 2])
        """
        config = self._resolve_generation_config(generation_config, kwargs)
        if return_dict_in_generate is None:
            return_dict_in_generate = bool(config.return_dict_in_generate)
        max_length = self._generation_max_length(config)
        if generator is None and seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        check_generator_device(generator, self.device)
        state = self._initial_state(input_ids, attention_mask, template_ids, config.num_return_sequences)
        input_lengths = state.lengths.tolist()
        if max(input_lengths) > max_length:
            raise ValueError(
                f"An input has {max(input_lengths)} tokens with its anchors, more than max_length={max_length}."
            )
        options = self._sampler_options(config, max_length, generator)
        pad = options.pad_token_id
        denoiser = self._cuda_graph_denoiser(pad) if config.cuda_graphs else self
        budget = self._mdlm_gap_budget(config, template_ids is not None) if self.config.objective == "mdlm" else None
        stream = DraftStream(streamer, state, pad) if streamer is not None else None  # every check ran before
        options.on_draft = stream.drafter(list(range(len(input_lengths)))) if stream else None
        caps = self._length_caps(config, input_lengths, max_length)
        if len(set(caps)) == 1:  # one cap for all: the host knows it, the samplers compare to it without a tensor
            options.max_length, caps = caps[0], None
        else:
            caps = torch.tensor(caps, device=self.device)
        if self.config.objective == "mdlm":
            output = sample_mdlm(
                denoiser, state, options, eos_token_id=self.config.eos_token_id, gap_budget=budget, caps=caps
            )
        else:
            output = sample_elastic(
                denoiser, state, options, gap_temperature=config.gap_temperature,
                gap_do_sample=config.gap_do_sample, lock_length=config.lock_length, caps=caps,
            )  # fmt: skip
        output["tokens_per_forward"] = tokens_per_forward(output, input_lengths)
        if stream is not None:
            stream.finish(output)
        if return_dict_in_generate:
            return output
        return output.sequences

    # -- helpers ----------------------------------------------------------------------------------------------

    def _resolve_generation_config(
        self, generation_config: GenerationConfig | None, kwargs: dict
    ) -> ElasticMDMGenerationConfig:
        """The model's `generation_config`, then the fields `generation_config` sets, then `kwargs` (one `update`, so
        one `validate()`); unknown names raise, and so do token ids outside the vocabulary."""
        config = ElasticMDMGenerationConfig(**self.generation_config.to_dict())
        overrides = generation_config.to_diff_dict() if generation_config is not None else {}
        unknown = config.update(**{**overrides, **kwargs})
        if unknown:
            raise ValueError(
                f"generate() got unknown arguments {sorted(unknown)}; see ElasticMDMGenerationConfig for the options."
            )
        config.check_token_ids(self.config.vocab_size)
        if config.num_return_sequences is None:
            config.num_return_sequences = 1
        return config

    def _sampler_options(
        self, config: ElasticMDMGenerationConfig, max_length: int, generator: torch.Generator | None
    ) -> SamplerOptions:
        """The `SamplerOptions` of a resolved `config` (what `generate()` and the server's requests run with)."""
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else self.config.eos_token_id
        return SamplerOptions(
            mask_token_id=self.config.mask_token_id,
            pad_token_id=pad,
            max_length=max_length,
            num_steps=config.num_steps,
            schedule=config.reveal_schedule(),
            token_processors=config.token_processors(self.device),
            do_sample=bool(config.do_sample),
            use_cache=bool(config.use_cache) and not self.config.time_conditioning,
            generator=generator,
            output_trajectory=config.output_trajectory,
            progress_bar=config.progress_bar,
        )

    def _cuda_graph_denoiser(self, pad_token_id: int) -> CUDAGraphDenoiser:
        """The model's bounded graph cache, kept across calls (`cuda_graphs.model_graph_denoiser`)."""
        return model_graph_denoiser(self, pad_token_id)

    @staticmethod
    def _mdlm_gap_budget(config: ElasticMDMGenerationConfig, has_template: bool) -> int | None:
        """Masks per open gap of a template for the MDLM sampler (`None` for prompts: one gap up to the canvas end)."""
        if not has_template:
            return None
        if config.mdlm_gap_budget is None:
            raise ValueError(
                "This is an objective='mdlm' model: its canvas has no gaps that grow, so template_ids need a fixed "
                "number of masks per open gap: pass mdlm_gap_budget=N (the paper's §5.4 MDLM baseline)."
            )
        return config.mdlm_gap_budget

    def _length_caps(self, config: ElasticMDMGenerationConfig, lengths: list[int], max_length: int) -> list[int]:
        """The longest each sequence may become: `max_length`, and with `max_new_tokens` its input length (anchors
        included) plus `max_new_tokens` when that is shorter."""
        if config.max_new_tokens is None:
            return [max_length] * len(lengths)
        return [min(max_length, n + config.max_new_tokens) for n in lengths]

    def _generation_max_length(self, config: ElasticMDMGenerationConfig) -> int:
        limit = self.config.max_position_embeddings
        if config.max_length is None:
            return limit
        if config.max_length > limit:
            raise ValueError(
                f"max_length={config.max_length} exceeds the model's max_position_embeddings={limit}; lower it."
            )
        return int(config.max_length)

    def _initial_state(
        self,
        input_ids: torch.Tensor | list[list[int]] | None,
        attention_mask: torch.Tensor | None,
        template_ids: torch.Tensor | list[list[int]] | None,
        num_return_sequences: int,
    ) -> ActiveState:
        """Packed start state: anchors, the open flag of every gap, each input repeated `num_return_sequences` times."""
        cfg = self.config
        special_ids = (cfg.bos_token_id, cfg.eos_token_id, cfg.mask_token_id)
        if None in special_ids:
            raise ValueError("The model config needs bos_token_id, eos_token_id and mask_token_id to generate.")
        cfg.check_special_ids()  # ids set on the config after it was built (a mask equal to BOS would overwrite it)
        return ActiveState.from_inputs(
            input_ids, attention_mask, template_ids, num_return_sequences, special_ids, self.device, cfg.vocab_size
        )


__all__ = ["ElasticMDMGenerationConfig", "ElasticMDMGenerationMixin"]

"""`generate(streamer=...)` (per-step drafts, final tokens, one `end`) and the tokens-per-forward count of the
output."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import BOS, EOS, MASK, PAD, random_model
from transformers.generation.streamers import BaseStreamer

from elastic_mdm import ElasticMDMForDiffusionLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def model() -> ElasticMDMForDiffusionLM:
    return random_model()


# ---------------------------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------------------------


class RecordingStreamer(BaseStreamer):
    """A `BaseStreamer` that keeps what it is given: `puts`, `drafts` (when `drafts=True`) and the `end` calls."""

    def __init__(self, drafts: bool = True) -> None:
        self.puts: list[torch.Tensor] = []
        self.drafts: list[torch.Tensor] = []
        self.ends = 0
        if not drafts:
            self.put_draft = None  # type: ignore[assignment]

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value)

    def put_draft(self, value: torch.Tensor) -> None:
        self.drafts.append(value)

    def end(self) -> None:
        self.ends += 1


def test_streamer_gets_prefix_drafts_final_tokens_and_end(model) -> None:
    """DiffusionGemma's order: `put(prompt)`, a clean draft at every step that runs a pass (growing, never a mask,
    each ending with EOS), `put(final tokens after the prompt)`, `end()` once; the samples do not change."""
    prompt = [BOS, 9, 10]
    kwargs = dict(num_steps=8, seed=3, return_dict_in_generate=True)
    streamer = RecordingStreamer()
    out = model.generate([prompt], streamer=streamer, **kwargs)
    plain = model.generate([prompt], **kwargs)
    assert torch.equal(out.sequences, plain.sequences)
    assert len(streamer.puts) == 2 and streamer.ends == 1
    assert streamer.puts[0].tolist() == [prompt]
    assert streamer.puts[1].tolist() == [out.sequences[0, len(prompt) : int(out.lengths[0])].tolist()]
    assert 1 <= len(streamer.drafts) <= 8 + 1
    sizes = [draft.shape[1] for draft in streamer.drafts]
    assert sizes == sorted(sizes) and sizes[0] == 1  # step 0: EOS alone after the prompt
    for draft in streamer.drafts:
        assert draft.dtype == torch.long and draft.shape[0] == 1
        assert int(draft[0, -1]) == EOS and not (draft == MASK).any()
    assert torch.equal(streamer.drafts[-1], streamer.puts[1])


def test_streamer_without_drafts_and_batched_prefixes(model) -> None:
    """A plain `BaseStreamer` gets the prefixes and the final tokens only; a batch comes padded with `pad_token_id`,
    an unconditional sample's prefix is BOS and a template's its head up to the first open gap."""
    streamer = RecordingStreamer(drafts=False)
    out = model.generate(
        template_ids=[[BOS, 5, MASK, 6, EOS]], num_return_sequences=2, num_steps=4, seed=0, streamer=streamer,
        return_dict_in_generate=True,
    )  # fmt: skip
    assert streamer.drafts == [] and streamer.ends == 1 and streamer.puts[0].tolist() == [[BOS, 5], [BOS, 5]]
    for row, seq, n in zip(streamer.puts[1], out.sequences, out.lengths.tolist(), strict=True):
        assert row[: n - 2].tolist() == seq[2:n].tolist() and (row[n - 2 :] == PAD).all()
    streamer = RecordingStreamer()
    model.generate(num_return_sequences=3, num_steps=4, seed=0, streamer=streamer)
    assert streamer.puts[0].tolist() == [[BOS]] * 3 and all(draft.shape[0] == 3 for draft in streamer.drafts)


def test_streamer_with_one_run_per_length_cap(model) -> None:
    """`max_new_tokens` with inputs of different lengths runs the sampler once per cap: every draft still holds the
    whole batch."""
    streamer = RecordingStreamer()
    prompts = [[BOS, 5], [BOS, 5, 6, 7]]
    ids = model.generate(prompts, num_steps=4, seed=0, max_new_tokens=3, streamer=streamer)
    assert streamer.drafts and all(draft.shape[0] == 2 for draft in streamer.drafts)
    assert streamer.puts[0][:, :4].tolist() == [[BOS, 5, PAD, PAD], [BOS, 5, 6, 7]] and ids.shape[0] == 2


def test_text_diffusion_streamer_prints_the_final_text(model, capsys) -> None:
    """Transformers' own `TextDiffusionStreamer` runs end to end (drafts overwritten in place, final text kept)."""
    from transformers import TextDiffusionStreamer

    class Digits:
        def decode(self, ids, **kwargs) -> str:
            return " ".join(str(int(t)) for t in (ids.tolist() if isinstance(ids, torch.Tensor) else ids))

    ids = model.generate([[BOS, 9]], num_steps=4, seed=0, streamer=TextDiffusionStreamer(Digits(), skip_prompt=True))
    printed = capsys.readouterr().out
    assert "\0337" in printed  # a draft was drawn (cursor saved) ...
    assert printed.endswith(" ".join(str(int(t)) for t in ids[0, 2:]) + "\n")  # ... and the final tokens kept


def test_bad_streamer_is_refused(model) -> None:
    with pytest.raises(ValueError, match="streamer must be a transformers BaseStreamer"):
        model.generate(num_steps=2, streamer=object())


# ---------------------------------------------------------------------------------------------------------------
# Tokens per forward pass
# ---------------------------------------------------------------------------------------------------------------


def test_tokens_per_forward_counts_generated_tokens_per_sequence_pass(model) -> None:
    """Generated tokens (prompt, anchors and padding excluded) over the passes that encoded each sequence: for one
    sequence `generated / num_passes`; for a batch the per-sequence passes, so caching and batching do not inflate
    it."""
    prompt = [BOS, 9, 10, 11]
    one = model.generate([prompt], num_steps=8, seed=1, return_dict_in_generate=True)
    generated = int(one.lengths[0]) - (len(prompt) + 1)
    assert one.sequence_passes.tolist() == [one.num_passes]
    assert one.tokens_per_forward == pytest.approx(generated / one.num_passes)
    for use_cache in (True, False):
        out = model.generate(
            [prompt, [BOS]], num_return_sequences=3, num_steps=8, seed=2, use_cache=use_cache,
            return_dict_in_generate=True,
        )  # fmt: skip
        starts = torch.tensor([len(prompt) + 1] * 3 + [2] * 3)
        assert out.sequence_passes.shape == (6,) and int(out.sequence_passes.max()) <= out.num_passes
        if not use_cache:
            assert (out.sequence_passes == out.num_passes).all()
        expected = float((out.lengths - starts).sum()) / float(out.sequence_passes.sum())
        assert out.tokens_per_forward == pytest.approx(expected) and out["tokens_per_forward"] == out.tokens_per_forward


def test_tokens_per_forward_with_one_run_per_length_cap(model) -> None:
    out = model.generate(
        [[BOS, 5], [BOS, 5, 6, 7]], num_steps=6, seed=0, max_new_tokens=4, return_dict_in_generate=True
    )
    expected = float((out.lengths - torch.tensor([3, 5])).sum()) / float(out.sequence_passes.sum())
    assert out.tokens_per_forward == pytest.approx(expected) and (out.sequence_passes > 0).all()

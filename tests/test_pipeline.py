"""`transformers.pipeline("text-generation")` on Elastic-MDM checkpoints (`elastic_mdm/pipeline_elastic_mdm.py`):
in process with the installed class, and from a saved folder through its remote code, as a user without the
package gets it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import pipeline

from elastic_mdm.pipeline_elastic_mdm import ElasticMDMTextGenerationPipeline

pytest.importorskip("jsonschema")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(synthetic_model, synthetic_tokenizer, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pipeline") / "tiny"
    synthetic_model.save_pretrained(path)
    synthetic_tokenizer.save_pretrained(path)
    return path


def direct_new_texts(synthetic_model, synthetic_tokenizer, prompt: str, **kwargs) -> list[str]:
    """What `generate` writes after the prompt in each sample, decoded as the pipeline decodes it."""
    ids = [synthetic_tokenizer.bos_token_id, *synthetic_tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    out = synthetic_model.generate([ids], return_dict_in_generate=True, **kwargs)
    rows = [seq[len(ids) : n] for seq, n in zip(out.sequences, out.lengths.tolist(), strict=True)]
    return synthetic_tokenizer.batch_decode(rows, skip_special_tokens=True)


def test_pipeline_continues_a_prompt_as_generate_does(synthetic_model, synthetic_tokenizer) -> None:
    pipe = pipeline(
        "text-generation",
        model=synthetic_model,
        tokenizer=synthetic_tokenizer,
        pipeline_class=ElasticMDMTextGenerationPipeline,
    )
    prompt = '{"name": "'
    result = pipe(prompt, num_steps=4, seed=0)
    (expected,) = direct_new_texts(synthetic_model, synthetic_tokenizer, prompt, num_steps=4, seed=0)
    assert result == [{"generated_text": prompt + expected}] and expected
    new = pipe(prompt, num_steps=4, seed=1, num_return_sequences=3, return_full_text=False)
    assert [row["generated_text"] for row in new] == direct_new_texts(
        synthetic_model, synthetic_tokenizer, prompt, num_steps=4, seed=1, num_return_sequences=3
    )


def test_batched_prompts_are_cut_at_their_own_prompt(synthetic_model, synthetic_tokenizer) -> None:
    """Left-padded batches: each row's new text is what `generate` gives for that prompt alone (greedy everything,
    so the draws do not depend on the batch)."""
    pipe = pipeline(
        "text-generation",
        model=synthetic_model,
        tokenizer=synthetic_tokenizer,
        pipeline_class=ElasticMDMTextGenerationPipeline,
    )
    prompts = ['{"a": ', '{"address": {"street": "']
    greedy = dict(num_steps=1, do_sample=False, gap_do_sample=False, max_new_tokens=6)
    batched = pipe(prompts, batch_size=2, return_full_text=False, **greedy)
    for prompt, rows in zip(prompts, batched, strict=True):
        assert [row["generated_text"] for row in rows] == direct_new_texts(
            synthetic_model, synthetic_tokenizer, prompt, **greedy
        )


def test_the_model_card_pipeline_is_registered_in_the_config(checkpoint: Path) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["custom_pipelines"]["text-generation"]["impl"] == (
        "pipeline_elastic_mdm.ElasticMDMTextGenerationPipeline"
    )
    assert (checkpoint / "pipeline_elastic_mdm.py").exists()
    with pytest.raises(ValueError, match="trust_remote_code"):
        pipeline("text-generation", model=str(checkpoint))


def test_pipeline_refuses_other_models(synthetic_tokenizer) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    other = GPT2LMHeadModel(GPT2Config(vocab_size=len(synthetic_tokenizer), n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="Elastic-MDM models only"):
        ElasticMDMTextGenerationPipeline(model=other, tokenizer=synthetic_tokenizer)


REMOTE_PIPELINE = """
import sys
from transformers import pipeline
pipe = pipeline("text-generation", model=sys.argv[1], trust_remote_code=True)
result = pipe('{"name": "', num_steps=4, seed=0)
assert result[0]["generated_text"].startswith('{"name": "'), result
print("PIPELINE=" + type(pipe).__name__ + " MODEL=" + type(pipe.model).__module__)
"""


def test_remote_code_pipeline_from_the_folder(checkpoint: Path, isolated_python) -> None:
    """Without the package: `pipeline("text-generation", model=path, trust_remote_code=True)` loads the pipeline
    class and the model from the checkpoint's own files."""
    result = isolated_python(REMOTE_PIPELINE, str(checkpoint))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "PIPELINE=ElasticMDMTextGenerationPipeline" in result.stdout
    assert "transformers_modules" in result.stdout  # the model class came from the checkpoint folder

r"""lm-evaluation-harness model `elastic_mdm` (`pip install elastic-mdm[lmeval]`).

    python -m elastic_mdm.integrations.lm_eval --model elastic_mdm --model_args pretrained=PATH,mc_samples=32 \
        --tasks lambada_openai --device cuda --batch_size 16

The harness finds models by name in its registry. lm-eval 0.4.13 only knows the models imported before it runs: this
module registers `elastic_mdm` on import, and running it as `python -m` starts the harness's own command line
(`lm_eval`, same arguments) after that import; from Python, `import elastic_mdm.integrations.lm_eval` before
`lm_eval.simple_evaluate(model="elastic_mdm", ...)` does the same. Later releases load the models of the
`lm_eval.models` entry-point group, which the package declares (`pyproject.toml`): there `lm_eval --model elastic_mdm`
works as is.

Several processes (`accelerate launch [--config_file configs/accelerate/ddp_cpu.yaml] -m
elastic_mdm.integrations.lm_eval ...`, or torchrun): each process holds the model on its own device and the harness
gives each its share of the requests (`rank`, `world_size`, as with its own `HFLM`), then gathers the answers on
process 0, which writes the results. Every answer depends on its own request only, never on which process or batch it
ran in: a `loglikelihood` request draws its Monte Carlo noise from a generator seeded with the seed and the request's
tokens, and a `generate_until` batch from one seeded with its prompts (with `batch_size=1`, each request's own), so
N processes give the results of one.

Requests (docs/design.md §5, a prompt is a prefix continued in one open gap before EOS):

* `generate_until(context, gen_kwargs)`: `generate(input_ids=[BOS + context])` with `max_new_tokens = max_gen_toks`
  and the token sampling of `gen_kwargs` (`do_sample`, `temperature`, `top_p`, `top_k`; greedy tokens by default as
  the harness expects), the checkpoint's generation config otherwise; the decoded new text is cut before the first
  stop sequence of `until`. A context longer than the model's window is cut from the left.
* `loglikelihood(context, continuation)`: minus an upper bound on `-log p(continuation | context)`, the NELBO of
  docs/design.md §2b with the context tokens as anchors (never noised, their closed gaps never grow, as in
  `generate`) and the continuation noised. It is a **bound, not the log-likelihood**: as MDM papers report, the
  returned value is at most the model's true conditional log-probability (up to Monte Carlo noise), estimated as
  the mean of `mc_samples` independent draws of the estimator (the step-0 term exact, one step `k ~ U{1..K}` of the
  K-step process, `K = nelbo_num_steps`). The bound is that of the complete rest of the sequence: the continuation
  followed by EOS (the gap head's length term is part of it), since an Elastic-MDM writes a whole sequence.
  `is_greedy` is always `False` (a diffusion sampler has no left-to-right argmax to compare with).
  `objective="mdlm"` checkpoints use MDLM's continuous-time bound on the same anchors (continuation, EOS and pads).
* `loglikelihood_rolling(text)`: the same bound for the text alone (BOS and EOS the only anchors), in windows of at
  most `max_position_embeddings - 2` tokens whose bounds add up.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
from lm_eval.api import registry
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM

from ..loading.checkpoints import load_model_and_tokenizer
from ..objectives.collators import TARGET_TOKENS
from ..objectives.nelbo import elastic_nelbo_terms
from ..objectives.table import get_objective, make_collator
from ..schedules_elastic_mdm import check_num_steps

MODEL_NAME = "elastic_mdm"
SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k")


def conditional_nelbo_terms(model, batch: dict, context_lengths: torch.Tensor) -> torch.Tensor:
    """Per-copy NELBO terms `[2B]` (nats, before the `nelbo_weight`s) of an `ElasticNELBOCollator` batch whose
    sequences start with `context_lengths` `[2B]` anchors (BOS and the context): the token CE of the masks plus the
    gap terms `l_k(g, m)` (`nelbo.gap_nelbo_terms`) of the open gaps only. The gaps between two context tokens are
    closed, as in `generate(input_ids=...)`, which never draws them: they are left out of the bound (docs/design.md
    §2b, §5; `nelbo.elastic_nelbo_terms` with `context_lengths`)."""
    token, gap = elastic_nelbo_terms(model, batch, context_lengths)
    return token + gap


class ElasticMDMLM(LM):
    """An Elastic-MDM (or MDLM-objective) checkpoint as an lm-evaluation-harness model (see the module docstring).

    Args (`--model_args key=value,...`):
        pretrained: Checkpoint folder or Hub id (or a loaded `ElasticMDMForDiffusionLM`, with `tokenizer`).
        tokenizer: Tokenizer (default: the checkpoint's).
        device, dtype: Where and in which dtype the model runs (`float32`, `bfloat16`, `float16`).
        batch_size: Requests per `generate` call; Monte Carlo draws of one request per NELBO pass (at most).
        mc_samples: Monte Carlo draws of the NELBO estimator averaged per `loglikelihood` request.
        nelbo_num_steps, nelbo_schedule: The K-step process whose bound is taken (default: the checkpoint's
            generation config `num_steps` and `schedule`, the process `generate` samples).
        max_gen_toks: Default `max_new_tokens` of `generate_until` when a task does not set it.
        seed: Seeds the sampler and the NELBO noise, with each request's tokens (the same request gets the same
            answer on any process, in any batch of NELBO requests).
        trust_remote_code: Run the checkpoint's own code (docs/security.md); default the installed classes.
        **generate_kwargs: Further `generate()` options for `generate_until` (`num_steps`, `schedule`, ...).
    """

    def __init__(
        self,
        pretrained: Any,
        tokenizer: Any = None,
        device: str | None = None,
        dtype: str = "float32",
        batch_size: int | str | None = 16,
        max_batch_size: int | None = None,
        mc_samples: int = 32,
        nelbo_num_steps: int | None = None,
        nelbo_schedule: str | None = None,
        max_gen_toks: int = 256,
        seed: int = 0,
        trust_remote_code: bool = False,
        **generate_kwargs: Any,
    ) -> None:
        super().__init__()
        if nelbo_num_steps is not None:  # before the model loads; 0 is refused, never taken for "the default"
            check_num_steps(nelbo_num_steps, "nelbo_num_steps")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched as one of several processes
            device = self.join_processes(device)
        if isinstance(pretrained, str):
            dtype = getattr(torch, dtype)
            self.model, tokenizer = load_model_and_tokenizer(pretrained, device, dtype, trust_remote_code, tokenizer)
        else:
            self.model = pretrained.to(device).eval()
            if tokenizer is None:
                raise ValueError("pretrained is a model object: pass its tokenizer too (tokenizer=...).")
        self.tokenizer = tokenizer
        if batch_size is None or (isinstance(batch_size, str) and batch_size.startswith("auto")):
            batch_size = 16  # the harness's "auto" search needs a model that fails on memory; 16 requests per call
        elif isinstance(batch_size, str) and batch_size.isdigit():  # the command line passes a string
            batch_size = int(batch_size)
        self.batch_size = positive_int("batch_size", batch_size)
        self.mc_samples = positive_int("mc_samples", mc_samples)
        self.max_gen_toks = positive_int("max_gen_toks", max_gen_toks)
        generation = self.model.generation_config
        self.nelbo_num_steps = generation.num_steps if nelbo_num_steps is None else nelbo_num_steps
        self.nelbo_schedule = generation.schedule if nelbo_schedule is None else nelbo_schedule
        self.seed = int(seed)
        self.generate_kwargs = generate_kwargs
        config = self.model.config
        self.max_length = int(config.max_position_embeddings)
        self.objective = get_objective(config.objective)
        self.collator = make_collator(
            config.objective, config, nelbo=True, max_length=self.max_length, seed=self.seed,
            schedule=self.nelbo_schedule, num_steps=self.nelbo_num_steps,
        )  # fmt: skip

    # -- several processes ------------------------------------------------------------------------------------------

    def join_processes(self, device: str) -> str:
        """Join the launch's process group (accelerate's `PartialState`: gloo on CPU, NCCL on GPUs); take this
        process's rank and the world size, and return its device."""
        from accelerate import PartialState

        state = PartialState(cpu=str(device).startswith("cpu"))
        launched = int(os.environ["WORLD_SIZE"])
        if state.num_processes != launched:
            raise ValueError(
                f"{launched} processes were launched but each would evaluate alone (a world of {state.num_processes}): "
                "on a machine without a GPU pass --device cpu, so that they join (gloo)."
            )
        self._rank, self._world_size = state.process_index, state.num_processes
        print(f"elastic_mdm: process {self._rank} of {self._world_size} on {state.device}", file=sys.stderr)
        return str(state.device)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's `tensor`, concatenated along dim 0 in rank order (0-d tensors: stacked)."""
        from accelerate.utils import gather

        return tensor if self.world_size == 1 else gather(tensor)

    def gather_object(self, obj: Any, dst: int = 0) -> list | None:
        """The list of every process's `obj` on process `dst`, None on the others."""
        if self.world_size == 1:
            return [obj]
        gathered = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj, gathered, dst=dst)
        return gathered

    def barrier(self) -> None:
        if self.world_size > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()

    def get_model_info(self) -> dict:
        """Written into the results' `config`: the processes the requests were shared over."""
        return {"num_processes": self.world_size}

    def request_generator(self, *parts: Any, device: torch.device | str | None = None) -> torch.Generator:
        """A generator (on `device`, default the model's) seeded with the seed and `parts` (a request's tokens): the
        same request gets the same draws whatever ran before it, beside it in a batch or on another process."""
        digest = hashlib.sha256(json.dumps([self.seed, *parts]).encode()).digest()
        generator = torch.Generator(device=device or self.model.device)
        return generator.manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "elastic_mdm")).replace("/", "__")

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # -- generate_until --------------------------------------------------------------------------------------------

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """`generate` from `BOS + context`, batched by identical `gen_kwargs` (each batch's draws seeded with its
        prompts: `request_generator`), cut before the first stop string."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        for indices in groups.values():
            gen_kwargs = dict(requests[indices[0]].args[1])
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            new_tokens = positive_int("max_gen_toks", gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            options = {"do_sample": False, **{k: gen_kwargs[k] for k in SAMPLING_KEYS if k in gen_kwargs}}
            if not options["do_sample"]:
                options = {"do_sample": False}  # temperature etc. mean nothing for greedy tokens
            keep = max(self.max_length - 2 - new_tokens, 0)  # context tokens that fit with the new ones
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                bos = self.model.config.bos_token_id
                prompts = [[bos, *last(self.encode(requests[i].args[0]), keep)] for i in chunk]
                out = self.model.generate(
                    input_ids=prompts, max_new_tokens=new_tokens, generator=self.request_generator(prompts, options),
                    return_dict_in_generate=True, **{**self.generate_kwargs, **options},
                )  # fmt: skip
                for i, prompt, seq, n in zip(chunk, prompts, out.sequences, out.lengths.tolist(), strict=True):
                    text = self.tokenizer.decode(seq[len(prompt) : n], skip_special_tokens=True)
                    results[i] = cut_at_stop(text, until)
                    self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
        return [r or "" for r in results]

    # -- loglikelihood ---------------------------------------------------------------------------------------------

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """`(-NELBO(continuation | context), False)` per request, the mean of `mc_samples` draws (a lower bound on
        the log-likelihood, see the module docstring)."""
        pairs = [self.split_pair(*request.args) for request in requests]
        bounds = self.nelbo(pairs)
        results = []
        for request, bound in zip(requests, bounds, strict=True):
            answer = (-bound, False)
            self.cache_hook.add_partial("loglikelihood", request.args, answer)
            results.append(answer)
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """`-NELBO(text)` with BOS and EOS as the only anchors, summed over windows of `max_length - 2` tokens."""
        window = self.max_length - 2
        results = []
        for request in requests:
            tokens = self.encode(request.args[0])
            pieces = [([], tokens[i : i + window]) for i in range(0, max(len(tokens), 1), window)]
            results.append(-sum(self.nelbo(pieces)))
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, results[-1])
        return results

    def split_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation tokens, the continuation taken from the tokenization of the whole text (so a
        merge across the boundary is seen as the model sees it) and the context cut from the left to fit."""
        if context and context[-1].isspace():  # the space belongs to the continuation's first token
            continuation, context = context[-1] + continuation, context[:-1]
        whole, head = self.encode(context + continuation), self.encode(context)
        cont = whole[len(head) :] if whole[: len(head)] == head else self.encode(continuation)
        if not cont:
            raise ValueError(f"The continuation {continuation!r} has no tokens; loglikelihood needs at least one.")
        room = self.max_length - 2 - len(cont)
        if room < 0:
            raise ValueError(
                f"A continuation of {len(cont)} tokens does not fit the model's window of {self.max_length} "
                "positions (BOS and EOS included); use a task with shorter continuations."
            )
        return last(head, room), cont

    def nelbo(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[float]:
        """The mean NELBO in nats of every `(context, continuation)` over `mc_samples` draws: passes of at most
        `batch_size` draws of one request, its noise from `request_generator` (the same value wherever it runs)."""
        bos, eos = self.model.config.bos_token_id, self.model.config.eos_token_id
        means = []
        for context, cont in pairs:
            anchors = [1] * (1 + len(context)) + [0] * len(cont) + [1]
            feature = {"input_ids": [bos, *context, *cont, eos], "anchor_mask": anchors}
            self.collator.generator = self.request_generator(feature["input_ids"], len(context), device="cpu")
            total = torch.zeros((), dtype=torch.float64)
            for start in range(0, self.mc_samples, self.batch_size):
                total += self.batch_nelbo([feature] * min(self.batch_size, self.mc_samples - start)).sum().cpu()
            means.append(float(total) / self.mc_samples)
        return means

    @torch.no_grad()
    def batch_nelbo(self, features: list[dict]) -> torch.Tensor:
        """`[len(features)]` one draw of the NELBO estimator (nats) of each feature."""
        batch = self.collator(features)
        device = self.model.device
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        batch.pop(TARGET_TOKENS, None)
        if not self.objective.learns_gaps:  # MDLM: no gap to close, its bound of the whole batch
            return self.objective.sequence_nelbo(self.model, batch)[2].double()
        context = torch.tensor([int(sum(f["anchor_mask"])) - 1 for f in features], device=device)  # BOS + context
        terms = conditional_nelbo_terms(self.model, batch, context.repeat(2))  # step 0, then step k of each
        weighted = batch["nelbo_weight"] * terms
        return weighted[: len(features)] + weighted[len(features) :]


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    return value


def last(tokens: list[int], count: int) -> list[int]:
    """The last `count` tokens (none for `count <= 0`)."""
    return tokens[len(tokens) - count :] if count > 0 else []


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string of `until`."""
    cut = min((text.find(stop) for stop in until if stop and stop in text), default=len(text))
    return text[:cut]


def main(argv: list[str] | None = None) -> None:
    """The harness's command line (`lm_eval ...`, same arguments) with `elastic_mdm` registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


def register(cls: type[LM]) -> type[LM]:
    """Register `cls` as `elastic_mdm` in the harness's model registry, unless the name is there already (a release
    that loaded the `lm_eval.models` entry point, whose loading imports this module)."""
    known = getattr(registry, "model_registry", None) or registry.MODEL_REGISTRY
    if MODEL_NAME not in known:
        registry.register_model(MODEL_NAME)(cls)
    return cls


register(ElasticMDMLM)

__all__ = ["ElasticMDMLM", "conditional_nelbo_terms", "MODEL_NAME"]

if __name__ == "__main__":
    main()

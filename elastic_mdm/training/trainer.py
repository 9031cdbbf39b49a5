"""Training Elastic-MDM (and the MDLM baseline on the same backbone) with the Transformers `Trainer`.

One forward pass per batch gives both loss terms of docs/design.md §2; `token_loss` and `gap_loss` are logged next to
their sum. Evaluation reports the NELBO of a fixed K-step process as bits per token and a perplexity bound.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from ..objectives.collators import TARGET_TOKENS, PackingCollator
from ..objectives.metrics import evaluation_collator, nelbo_metrics
from ..objectives.table import get_objective, make_collator
from .arguments import ElasticMDMTrainingArguments

MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent / "templates" / "model_card.md"  # package data (pyproject)


def make_collators(args: ElasticMDMTrainingArguments, config) -> tuple[PackingCollator, PackingCollator]:
    """Training and evaluation collators of the objective. Training noise is drawn at loss time on the device from
    the global RNG (checkpointed by the Trainer: exact resume); evaluation noise is seeded (the same every run)."""
    train = make_collator(args.objective, config, noise_sampler=args.noise_sampler(), defer_noise=True)
    return train, evaluation_collator(args.objective, config, args.eval_schedule, args.eval_num_steps, args.seed)


def freeze_gap_head(model: torch.nn.Module) -> None:
    """Freeze the gap head (peft's trainable `modules_to_save` copy included) of a model trained without gaps (MDLM).

    The MDLM loss never reads the gap head, so its parameters never get a gradient: frozen, the optimizer skips them
    exactly as it skips a parameter whose `grad` is None (the same updates as before), and DDP has no parameter to
    wait for; left trainable, DDP fails at the second step ("parameters that were not used in producing loss")
    unless it searches the autograd graph for unused parameters at every step (`find_unused_parameters`)."""
    for name, parameter in model.named_parameters():
        if "gap_head" in name.split("."):
            parameter.requires_grad_(False)


def read_streams_per_process(args: ElasticMDMTrainingArguments) -> None:
    """Every process reads and packs its own batches of a streamed (iterable) dataset: `dispatch_batches=False`.

    accelerate's default for an `IterableDataset` is to dispatch: process 0 reads `num_processes` batches, concatenates
    every tensor along dim 0 and slices it, which cuts a packed batch (`clean_ids` `[N]`, `clean_cu_seqlens` `[B + 1]`)
    at the wrong places. Without dispatch each process iterates its own shard of the stream (the stream's own shards
    when it has one per process, else every `num_processes`-th batch of examples: accelerate's `IterableDatasetShard`),
    and the collator packs whole sequences on every process. An explicit `dispatch_batches=True` is refused."""
    if args.accelerator_config.dispatch_batches:
        raise ValueError(
            "accelerator_config.dispatch_batches=True slices the packed batches of a streamed dataset at the wrong "
            "places; leave it unset (or false): every process then reads its own shard of the stream."
        )
    args.accelerator_config.dispatch_batches = False


class TokensEncoded(TrainerCallback, ExportableState):
    """Positions the backbone encoded in training, summed over processes and over the whole run: the compute measure
    for comparing objectives at equal cost (Elastic encodes only its active tokens, MDLM its whole canvas).

    `total` (all processes, up to the last `fold`: each log and each checkpoint) is saved with every checkpoint in
    `TrainerState.stateful_callbacks` and a resumed run continues from it; `pending` (this process, since the last
    fold) is a sum of batch shapes. (Transformers' own `num_input_tokens_seen` cannot count it: it reads
    `input_ids` before `compute_loss`, and a deferred-noise batch holds only the clean ids.)
    """

    def __init__(self, total: int = 0) -> None:
        self.total = total
        self.pending = 0

    def state(self) -> dict:
        return {"args": {}, "attributes": {"total": self.total}}

    def fold(self, device: torch.device) -> int:
        """`total += Σ_processes pending`: one all-reduce, so every process calls it at the same step."""
        pending = torch.tensor(self.pending, dtype=torch.int64, device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(pending)
        self.total += int(pending)
        self.pending = 0
        return self.total

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        saved = state.stateful_callbacks.get(type(self).__name__, {}) if state.global_step else {}  # a resume's
        self.total = saved.get("attributes", {}).get("total", 0)
        self.pending = 0


class ElasticMDMTrainer(Trainer):
    """`Trainer` for Elastic-MDM and its MDLM baseline.

    * training: `loss = token_loss + λ_gap · gap_loss` from one forward pass; the two terms are logged apart;
    * evaluation: the per-sequence step terms, and the NELBO bound of the K-step process (`eval_num_steps`,
      `eval_schedule`) as bits per token and a perplexity bound: `Σ_gaps l_0 + K · [Σ_masks CE + Σ_gaps l_k(g, m)]`
      at one `k ~ U{1..K}` per sequence, with the exact gap term of `objectives/nelbo.py`; for `objective="mdlm"`,
      MDLM's bound `E_t[(1/t) Σ_masks CE]`. Tokens per sequence: interior tokens + EOS (`n + 1`), the same count for
      both (`objectives.metrics.nelbo_metrics`).

    Example (two steps on the built-in synthetic JSON task, then the held-out bound):

    >>> import contextlib, io, tempfile
    >>> from elastic_mdm import ElasticMDMConfig, ElasticMDMForDiffusionLM
    >>> from elastic_mdm.data import synthetic
    >>> from elastic_mdm.training.arguments import ElasticMDMTrainingArguments
    >>> tokenizer = synthetic.build_tokenizer(num_records=200)
    >>> config = ElasticMDMConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
    ...     num_attention_heads=2, max_position_embeddings=80, mask_token_id=tokenizer.mask_token_id,
    ...     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    ...     pad_token_id=tokenizer.pad_token_id)
    >>> with contextlib.redirect_stdout(io.StringIO()):  # the Trainer (and accelerate's backends) print logs
    ...     args = ElasticMDMTrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=2, eval_num_steps=4,
    ...         per_device_train_batch_size=8, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)
    ...     trainer = ElasticMDMTrainer(model=ElasticMDMForDiffusionLM(config), args=args, processing_class=tokenizer,
    ...         train_dataset=synthetic.synthetic_dataset(tokenizer, 32, seed=0),
    ...         eval_dataset=synthetic.synthetic_dataset(tokenizer, 8, seed=1))
    ...     result = trainer.train()
    ...     metrics = trainer.evaluate()
    >>> result.global_step, metrics["eval_nelbo_bits_per_token"] > 0, metrics["eval_ppl_bound"] > 1
    (2, True, True)
    """

    args: ElasticMDMTrainingArguments

    def __init__(self, model=None, args: ElasticMDMTrainingArguments | None = None, data_collator=None, **kwargs):
        if args is None or not isinstance(args, ElasticMDMTrainingArguments):
            raise TypeError("ElasticMDMTrainer needs args=ElasticMDMTrainingArguments(...).")
        train_collator, self.eval_collator = make_collators(args, model.config)
        if not get_objective(args.objective).learns_gaps:
            freeze_gap_head(model)
        if any(isinstance(kwargs.get(split), IterableDataset) for split in ("train_dataset", "eval_dataset")):
            read_streams_per_process(args)
        model.config.objective = args.objective  # generate() samples with the matching sampler
        if args.gap_loss_weight is not None:
            model.config.gap_loss_weight = args.gap_loss_weight
        super().__init__(model=model, args=args, data_collator=data_collator or train_collator, **kwargs)
        self._component_sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.args.device))
        self._component_count = 0
        self.add_callback(TokensEncoded())

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        if PackingCollator.is_clean(inputs):  # deferred noise: drawn here, on the batch's device
            inputs = self.data_collator.apply_noise(inputs)
        outputs = model(**{k: v for k, v in inputs.items() if k != TARGET_TOKENS})
        if model.training:
            for name in ("token_loss", "gap_loss"):
                self._component_sums[name] += outputs[name].detach().float()
            self._component_count += 1
            self.tokens_encoded.pending += inputs["input_ids"].numel()  # a shape: no device read
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    @property
    def tokens_encoded(self) -> TokensEncoded:
        """The run's `TokensEncoded` counter (looked up: restoring callback states from a checkpoint replaces it)."""
        return next(cb for cb in self.callback_handler.callbacks if isinstance(cb, TokensEncoded))

    def _save_checkpoint(self, model, trial) -> None:
        """Fold the encoded-token count first (every process saves a checkpoint, whatever the save strategy), so the
        checkpoint's state holds the count up to this step."""
        self.tokens_encoded.fold(self.args.device)
        super()._save_checkpoint(model, trial)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the mean `token_loss` / `gap_loss` since the last log, and `tokens_encoded` (see `TokensEncoded`), to
        the training logs."""
        if "loss" in logs and self._component_count:
            logs["tokens_encoded"] = self.tokens_encoded.fold(self.args.device)
            for name, total in self._component_sums.items():
                mean = self.accelerator.reduce(total, reduction="mean") / self._component_count
                logs[name] = round(float(mean), 4)
            self._component_sums.clear()
            self._component_count = 0
        super().log(logs, start_time)

    @torch.no_grad()
    def evaluate(self, eval_dataset: Dataset | None = None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """Loss terms and the NELBO bound on the evaluation set (fixed K and schedule, seeded noise)."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs an eval_dataset.")
        metrics = nelbo_metrics(
            self.model,
            self._eval_dataloader(dataset),
            self.args.objective,
            reduce=lambda stats: self.accelerator.reduce(stats, reduction="sum"),
            autocast=self.accelerator.autocast,
        )
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in metrics.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        self._memory_tracker.stop_and_update_metrics(metrics)
        return metrics

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, **kwargs) -> None:
        """Write `README.md` from the package's `templates/model_card.md` (also what `push_to_hub` uploads)."""
        if not self.is_world_process_zero():
            return
        eval_results = {k: v for log in self.state.log_history for k, v in log.items() if k.startswith("eval_")}
        card = build_model_card(
            self.model, self.args, dataset_name or getattr(self, "dataset_name", None), eval_results, model_name
        )
        card.save(Path(self.args.output_dir) / "README.md")

    def _eval_dataloader(self, dataset: Dataset) -> DataLoader:
        self.eval_collator.reset_generator()  # every evaluation sees the same noise
        loader = DataLoader(
            dataset,
            batch_size=self.args.per_device_eval_batch_size,
            collate_fn=self.eval_collator,
            num_workers=self.args.dataloader_num_workers,
        )
        return self.accelerator.prepare(loader)


def build_model_card(
    model,
    args: ElasticMDMTrainingArguments,
    dataset_name: str | None,
    eval_results: dict[str, float],
    model_name: str | None = None,
):
    """A `huggingface_hub.ModelCard` filled with the config, data, objective, noise, optimiser and eval numbers."""
    from huggingface_hub import ModelCard, ModelCardData

    config = getattr(model, "config", None) or model.module.config
    repo_id = args.hub_model_id or model_name or Path(args.output_dir).name
    card_data = ModelCardData(
        library_name="transformers",
        license="apache-2.0",
        tags=["elastic-mdm", "masked-diffusion", "variable-length", args.objective],
        datasets=[dataset_name] if dataset_name else None,
        pipeline_tag="text-generation",  # pipeline("text-generation", trust_remote_code=True): pipeline_elastic_mdm
    )
    generation = getattr(model, "generation_config", None)
    values = {
        name: getattr(config, name)
        for name in (
            "block_type",
            "num_hidden_layers",
            "hidden_size",
            "num_attention_heads",
            "max_position_embeddings",
            "max_gap",
            "vocab_size",
            "mask_token_id",
            "bos_token_id",
            "eos_token_id",
            "time_conditioning",
            "gap_noise_conditioning",
        )
    }
    return ModelCard.from_template(
        card_data,
        template_path=str(MODEL_CARD_TEMPLATE),
        model_name=model_name or repo_id,
        repo_id=repo_id,
        num_parameters=f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M",
        objective=args.objective,
        dataset=dataset_name or "unspecified",
        schedule_families=", ".join(args.schedule_families),
        horizon_min=args.horizon_min,
        horizon_max=args.horizon_max,
        length_share=args.length_share,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        batch_size=args.per_device_train_batch_size,
        max_steps=args.max_steps,
        precision="bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        eval_results={k: round(v, 4) if isinstance(v, float) else v for k, v in eval_results.items()},
        token_mask_share=args.token_mask_share,
        lock_length=getattr(generation, "lock_length", False),
        num_steps=getattr(generation, "num_steps", 128),
        schedule=getattr(generation, "schedule", "linear"),
        **values,
    )


__all__ = [
    "ElasticMDMTrainer",
    "TokensEncoded",
    "make_collators",
    "freeze_gap_head",
    "read_streams_per_process",
    "build_model_card",
]

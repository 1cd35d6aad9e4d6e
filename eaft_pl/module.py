"""The LightningModule: a Hugging Face causal LM trained with any gate of the EAFT loss family."""

from __future__ import annotations

import time
import warnings
from typing import Any, Dict, List, Literal, Optional, Tuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from eaft_pl.analysis.predictions import per_example_means
from eaft_pl.data.packing import check_packing_support
from eaft_pl.loss.chunked import LogitTransform, check_chunked_support
from eaft_pl.loss.forward import causal_lm_statistics
from eaft_pl.loss.conflict import CONFLICT_MAX_LABEL_PROB, CONFLICT_MAX_NORM_ENTROPY
from eaft_pl.loss.gates import EAFTGate, Gate
from eaft_pl.loss.metrics import TokenStatsMetric
from eaft_pl.loss.reference_gates import FLOWGate
from eaft_pl.loss.stats import TokenStats
from eaft_pl.models.loading import build_causal_lm, enable_gradient_checkpointing, load_causal_lm, load_tokenizer
from eaft_pl.models.templates import resolve_chat_template
from eaft_pl.progress import trainer_progress
from eaft_pl.reference import ReferenceTable, frozen_copy, frozen_reference, reference_for_datamodule, token_kl
from eaft_pl.training.adapter_checkpoints import ADAPTER_ONLY_KEY, drop_frozen_base, restore_frozen_base
from eaft_pl.training.fsdp2 import loads_checkpoints_itself, shard_with_fsdp2
from eaft_pl.training.lora import AdapterDisabled, LoRAOptions, apply_lora
from eaft_pl.training.normalization import StepNormalizer, scale_gradients
from eaft_pl.training.numerics import NonFiniteStepGuard
from eaft_pl.training.optim import adamw_warmup_cosine, warmup_cosine
from eaft_pl.training.options import check_module_options, check_strategy_options

# warmup_cosine and ADAPTER_ONLY_KEY lived here before training/optim.py and adapter_checkpoints.py.
__all__ = ["EAFTModule", "warmup_cosine", "ADAPTER_ONLY_KEY"]

KEY_CHAT_TEMPLATE = "model.init_args.chat_template"


class EAFTModule(pl.LightningModule):
    """Fine-tunes a causal LM with a per-token weighted cross-entropy (SFT, EAFT, DFT, masks, ...).

    The model comes from ``model_name_or_path`` (a local folder or a hub id) or, for tests and toy
    runs, is built with random weights from ``model_config``. It is created in ``configure_model()``
    so that FSDP/DeepSpeed can shard it while it is built.

    Loss normalisation: with ``loss_normalization="step"`` the loss of an optimizer step is
    ``sum(w * CE) / N`` where N counts the supervised tokens of all micro-batches of the step on all
    ranks, as LLaMA-Factory's ``num_items_in_batch`` does; a micro-batch mean would weight the tokens
    of short micro-batches more. Each micro-batch returns its weighted sum and the gradients are
    divided by N just before clipping and the optimizer step.

    Logged metrics (see :class:`~eaft_pl.loss.metrics.TokenStatsMetric`): ``train/<stat>`` over the
    tokens of each optimizer step, ``val/<name>/<stat>`` and ``test/<name>/<stat>`` over whole
    evaluation sets, plus ``train/lr``.

    Args:
        model_name_or_path: Local folder or hub id of a ``transformers`` causal LM.
        model_config: A config dict with ``model_type`` to build a randomly initialised model instead.
        tokenizer_name_or_path: Tokenizer folder or hub id; defaults to ``model_name_or_path``. The CLI
            links it to ``data.init_args.tokenizer_name_or_path``.
        gate: The per-token weight; ``None`` means ``EAFTGate()`` (the paper's EAFT).
        top_k: K of the top-K entropy (20 in the paper); clamped to the vocabulary size.
        learning_rate: Peak AdamW learning rate (the paper: 1e-5).
        weight_decay: AdamW weight decay, applied to matrices only (not to biases and norms).
        warmup_ratio: Share of the optimizer steps spent in linear warmup (the paper: 0.03).
        min_lr_ratio: The cosine schedule ends at ``learning_rate * min_lr_ratio``.
        adam_betas: AdamW betas.
        adam_eps: AdamW epsilon.
        loss_normalization: ``"step"`` divides by the supervised tokens of the whole optimizer step
            (exact under gradient accumulation and DDP); ``"micro_batch"`` takes each micro-batch's
            mean (needed for DeepSpeed, which owns the gradients).
        gradient_checkpointing: Recompute activations in backward to save memory (HF's implementation).
        torch_dtype: Dtype to load the weights in (``bfloat16`` for bf16-true training); mixed precision
            is ``trainer.precision``.
        attn_implementation: Passed to ``from_pretrained`` (``sdpa``, ``flash_attention_2``, ``eager``).
        trust_remote_code: Allow Python code shipped with the model/tokenizer to run. Off by default.
        conflict_max_norm_entropy: A token counts as a confident conflict when its normalised top-K
            entropy is at most this ...
        conflict_max_label_prob: ... and its label probability is at most this.
        log_full_entropy: Also log full-vocabulary entropy (costs about 3x a CE forward).
        chunk_size: Compute the loss from the backbone's hidden states and the LM-head weight this many
            tokens at a time (:mod:`eaft_pl.loss.chunked`), so the ``(tokens, vocab)`` logits never exist in
            full: the memory of the loss drops from several times the logits to a few
            ``(chunk_size, vocab)`` buffers, for every gate, with the same values and gradients. Needs a
            model whose logits are its LM head applied to the last hidden state, optionally scaled or
            soft-capped (Llama, Qwen2/2.5/3, Mistral, Gemma 2/3, Phi-3, Cohere, Granite, ...; checked on
            a short input when the model is built). ``None`` (default) uses the plain path.
        reference_source: Where base-model statistics come from, for gates that read them
            (``Gate.needs_reference``: static EAFT, the static conflict mask, FLOW) and for the KL
            term: ``"cache"`` runs one no-grad pass over every split of the DataModule when the model
            is built and keeps the result on disk under ``reference_cache_dir``, keyed by model,
            tokenizer and data fingerprints and K (:mod:`eaft_pl.reference`); ``"frozen"`` keeps a
            frozen copy of the base in memory (twice the weights) and runs it on every batch. The KL
            term needs ``"frozen"``.
        reference_cache_dir: Folder of the reference cache (``null``: compute, do not store).
        reference_kl_coef: beta of an added ``beta * KL`` term per supervised token (0: none). SFT-KL
            is the SFT gate with 0.5 (the paper's beta); ASFT is the DFT gate with 0.1 and
            ``reference_kl_direction: ref_policy`` (LLaMA-Factory). The KL is exact over the
            vocabulary at each supervised position and is normalised like the CE (by the step's
            supervised tokens). Plain path only (refused with ``chunk_size``).
        reference_kl_direction: ``"policy_ref"``: KL(p_theta || p_ref); ``"ref_policy"``:
            KL(p_ref || p_theta) (see :func:`eaft_pl.reference.token_kl`).
        lora: Train LoRA adapters instead of every weight (needs ``pip install 'eaft-pl[lora]'``): the
            fields of ``peft.LoraConfig`` (or a ``LoRAOptions`` / ``peft.LoraConfig`` from Python), with
            the checks and defaults of :class:`eaft_pl.training.lora.LoRAOptions`: ``{r: 16, alpha: 32,
            dropout: 0.05, target_modules: all-linear, use_dora: false}``. The base model is the
            adapted one with its adapters off, so ``reference_source: frozen`` costs no copy. With
            ``model_name_or_path``, checkpoints hold the adapters only (and their optimizer state;
            not under FSDP2); resuming reloads the base from there.
        max_skipped_steps: An optimizer step whose loss or gradient holds a NaN or inf is skipped
            (no weight, moment or step count of AdamW changes; the learning-rate schedule still
            advances), counted and logged as ``train/skipped_steps``; once more than this many were
            skipped, training stops with an error naming the step and batch. 0 stops at the first.
            Under fp16 with a GradScaler, inf gradients are the scaler's to skip and are not counted.
        chat_template: A chat template for the module's own tokenizer (a Jinja template, or ``chatml`` or
            ``gemma``, :mod:`eaft_pl.models.templates`), which the forgetting
            callback's tasks use to render their prompts (``chat_prompt_ids``). ``None`` (default) takes
            the DataModule's ``data.init_args.chat_template`` when the trainer has one, so that the
            evaluation prompts are rendered as the training data was, and else keeps the tokenizer's
            own. Needed for a tokenizer without a template (Gemma 3 270M) outside a trainer
            (``eaft-pl export``, Python); giving both this and a different DataModule template is an error.
    """

    def __init__(
        self,
        model_name_or_path: Optional[str] = None,
        model_config: Optional[Dict[str, Any]] = None,
        tokenizer_name_or_path: Optional[str] = None,
        gate: Optional[Gate] = None,
        top_k: int = 20,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        min_lr_ratio: float = 0.0,
        adam_betas: Tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        loss_normalization: Literal["step", "micro_batch"] = "step",
        gradient_checkpointing: bool = False,
        torch_dtype: Optional[str] = None,
        attn_implementation: Optional[str] = None,
        trust_remote_code: bool = False,
        conflict_max_norm_entropy: float = CONFLICT_MAX_NORM_ENTROPY,
        conflict_max_label_prob: float = CONFLICT_MAX_LABEL_PROB,
        log_full_entropy: bool = False,
        chunk_size: Optional[int] = None,
        reference_source: Literal["cache", "frozen"] = "cache",
        reference_cache_dir: Optional[str] = "outputs/reference_cache",
        reference_kl_coef: float = 0.0,
        reference_kl_direction: Literal["policy_ref", "ref_policy"] = "policy_ref",
        lora: Optional[Dict[str, Any]] = None,
        max_skipped_steps: int = 10,
        chat_template: Optional[str] = None,
    ) -> None:
        super().__init__()
        check_module_options(
            model_name_or_path=model_name_or_path, model_config=model_config, top_k=top_k, learning_rate=learning_rate,
            weight_decay=weight_decay, warmup_ratio=warmup_ratio, min_lr_ratio=min_lr_ratio, adam_betas=adam_betas,
            adam_eps=adam_eps, loss_normalization=loss_normalization, torch_dtype=torch_dtype,
            conflict_max_norm_entropy=conflict_max_norm_entropy, conflict_max_label_prob=conflict_max_label_prob,
            chunk_size=chunk_size, reference_source=reference_source, reference_kl_coef=reference_kl_coef,
            reference_kl_direction=reference_kl_direction, max_skipped_steps=max_skipped_steps,
        )  # fmt: skip
        resolve_chat_template(chat_template, KEY_CHAT_TEMPLATE)  # a misspelt name fails here, not at fit
        lora_options = LoRAOptions.from_value(lora)  # a mapping (the CLI's, a checkpoint's), LoRAOptions or LoraConfig
        lora = lora_options.to_dict() if lora_options is not None else None
        # hparams keep the plain mapping: checkpoints load with torch.load(weights_only=True), which
        # refuses pickled classes.
        self.save_hyperparameters()
        self.gate: Gate = gate if gate is not None else EAFTGate()
        #: The LoRA options (``hparams.lora`` is a plain mapping when the CLI builds the module).
        self.lora: Optional[LoRAOptions] = lora_options
        if reference_source == "frozen" and isinstance(self.gate, FLOWGate) and self.gate.tau is None:
            raise ValueError(
                "FLOWGate's tau defaults to the median base loss over the training set, which a frozen copy seen one "
                "batch at a time cannot give; use model.init_args.reference_source: cache or set the gate's tau"
            )
        #: The reference pass's table (``reference_source: cache``), or None.
        self.reference_table: Optional[ReferenceTable] = None
        #: The frozen base (``reference_source: frozen``); kept out of the module's parameters and state.
        self._frozen: List[nn.Module] = []
        #: Wall seconds of the reference pass (or of loading it) and whether the cache held it.
        self.reference_seconds: Optional[float] = None
        self.reference_cache_hit: Optional[bool] = None
        self.model: Optional[nn.Module] = None
        self.tokenizer: Any = None
        self.logit_transform = LogitTransform()
        self.train_metrics = self._new_metric()
        self.eval_metrics = nn.ModuleDict()
        #: Step-level token normalisation (``loss_normalization: step``).
        self.normalizer = StepNormalizer()
        #: Skips optimizer steps with a non-finite loss or gradient (``max_skipped_steps``).
        self.nonfinite = NonFiniteStepGuard(max_skipped_steps)
        self._last_logged_step = 0
        self._step_lr: Optional[float] = None
        #: Set by callbacks that read ``TokenStats.logit_grad_norm`` from the outputs of validation/test
        #: steps (e.g. training diagnostics); off by default because it costs another pass over the logits.
        self.eval_grad_norm = False

    # ---- model ---------------------------------------------------------------------------------

    def _new_metric(self) -> TokenStatsMetric:
        return TokenStatsMetric(
            conflict_max_norm_entropy=self.hparams.conflict_max_norm_entropy,
            conflict_max_label_prob=self.hparams.conflict_max_label_prob,
            full_entropy=self.hparams.log_full_entropy,
        )

    @property
    def method(self) -> str:
        """Short name of the training method (the gate's name), used in run tags."""
        return self.gate.name

    def configure_model(self) -> None:
        if self.model is not None:  # Lightning may call this more than once (fit then test)
            return
        self.build_model()
        shard_with_fsdp2(self)  # fully_shard under ModelParallelStrategy / FSDP2Strategy; else nothing

    def build_model(self, reference: bool = True) -> None:
        """Load or build the tokenizer and the model, add the LoRA adapters (``lora``) and, with
        ``reference``, prepare what the gate needs of the base model. ``eaft-pl export`` builds with
        ``reference=False``: it only reads the weights."""
        hp = self.hparams
        tok_path = hp.tokenizer_name_or_path or hp.model_name_or_path
        if tok_path is None:
            raise ValueError("model.init_args.tokenizer_name_or_path is needed to build a model from model_config")
        self.tokenizer = load_tokenizer(tok_path, trust_remote_code=hp.trust_remote_code)
        template = self._chat_template()
        if template is not None:
            self.tokenizer.chat_template = template
        if hp.model_name_or_path is not None:
            model = load_causal_lm(hp.model_name_or_path, hp.torch_dtype, hp.trust_remote_code, hp.attn_implementation)
        else:
            model = build_causal_lm(hp.model_config, self.tokenizer, hp.torch_dtype)
        n_embed = model.get_input_embeddings().weight.shape[0]
        if len(self.tokenizer) > n_embed:
            raise ValueError(
                f"the tokenizer at {tok_path!r} has {len(self.tokenizer)} tokens but the model's embedding has "
                f"{n_embed} rows; use the model's own tokenizer or resize the embeddings before training"
            )
        if hp.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if hp.chunk_size is not None:
            self.logit_transform = LogitTransform.from_config(model.config)
            check_chunked_support(model, self.logit_transform)
        # from_pretrained returns the model in eval mode and Lightning (>= 2.2) keeps each submodule's
        # mode as it finds it: without this, dropout would be off during training.
        model.train()
        self.model = model
        lora_frozen = self.lora is not None and hp.reference_source == "frozen"
        if reference and self.needs_reference and not lora_frozen:
            # Before the adapters: the cache is keyed by the base weights, shared with full fine-tuning.
            self._prepare_reference()
        if self.lora is not None:
            self._add_lora(reference and self.needs_reference and lora_frozen)

    def _add_lora(self, frozen_reference: bool) -> None:
        """Wrap the model with the adapters; the base model is the adapted one with its adapters off."""
        self.model = apply_lora(self.model, self.lora)
        self.model.train()
        head = self.model.get_output_embeddings()
        if self.hparams.chunk_size is not None and type(head) is not nn.Linear:
            kind = f"{type(head).__module__}.{type(head).__name__}"
            raise ValueError(
                f"model.init_args.chunk_size reads the LM head's weight directly, but LoRA made it a {kind} (lm_head "
                "in model.init_args.lora.target_modules or modules_to_save); leave the LM head out of both or unset chunk_size"
            )
        if frozen_reference:
            self._frozen = [AdapterDisabled(self.model)]  # no copy: the same weights, adapters off

    # ---- checkpoints ---------------------------------------------------------------------------

    @property
    def adapter_only_checkpoints(self) -> bool:
        """LoRA on a base that ``model_name_or_path`` reloads: checkpoints leave the frozen base out.
        (A ``model_config`` base has random weights that only the checkpoint could restore; under
        ModelParallelStrategy / FSDP2 they hold the base too: see ``loads_checkpoints_itself``.)"""
        return self.lora is not None and self.hparams.model_name_or_path is not None and not loads_checkpoints_itself(self._trainer)

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped so far for a non-finite loss or gradient (``max_skipped_steps``)."""
        return self.nonfinite.skipped

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self.nonfinite.skipped = value

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        # The divisor is fixed by the run's first micro-batch; a resumed run keeps it so that its
        # losses and gradients round exactly as the uninterrupted run's. The skip count keeps counting
        # towards max_skipped_steps across a resume.
        checkpoint["eaft_loss_divisor"] = self.normalizer.divisor
        checkpoint["eaft_skipped_steps"] = self.skipped_steps
        if self.adapter_only_checkpoints:
            drop_frozen_base(checkpoint, self.model, self.hparams.model_name_or_path)

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        self.normalizer.divisor = float(checkpoint.get("eaft_loss_divisor", 0.0))
        self.skipped_steps = int(checkpoint.get("eaft_skipped_steps", 0))
        restore_frozen_base(checkpoint, self.model, self.state_dict(), self.adapter_only_checkpoints)

    def _chat_template(self) -> Optional[str]:
        """The template the module's tokenizer gets: ``chat_template``, else the trainer's DataModule's
        ``chat_template`` (the one the training data was rendered with), else None (the tokenizer's own).

        Raises:
            ValueError: both are set and differ: the evaluation prompts would be rendered unlike the
                training data.
        """
        # hparams keep the option as given (a name stays a name); checkpoints written before it lack it.
        own = resolve_chat_template(self.hparams.get("chat_template"), KEY_CHAT_TEMPLATE)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        data = getattr(datamodule, "chat_template", None)  # resolved by the DataModule
        if own is not None and data is not None and own != data:
            raise ValueError(
                "model.init_args.chat_template and data.init_args.chat_template differ: the forgetting tasks' prompts "
                "would be rendered unlike the training data; set only data.init_args.chat_template (the module copies it)"
            )
        return own if own is not None else data

    @property
    def needs_reference(self) -> bool:
        """Whether the gate or the KL term reads the reference (base) model."""
        return bool(getattr(self.gate, "needs_reference", False)) or self.hparams.reference_kl_coef > 0

    def _prepare_reference(self) -> None:
        """Freeze a copy of the base, or run (or load) the reference pass over the DataModule's splits.

        Runs when the model is built, before any checkpoint is restored into it: the statistics are
        those of the base model even when training resumes.
        """
        hp = self.hparams
        start = time.perf_counter()
        if hp.reference_source == "frozen":
            self._frozen = [frozen_copy(self.model)]  # a list: not registered as a submodule, so never trained or saved
            self.reference_seconds = time.perf_counter() - start
            return
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        table, path, hit = reference_for_datamodule(
            self.model, self.tokenizer, datamodule, hp.top_k, hp.reference_cache_dir, owner=self.gate.name,
            progress_bar=trainer_progress(self._trainer),
        )
        self.reference_table, self.reference_cache_hit = table, hit
        self.reference_seconds = time.perf_counter() - start
        rank_zero_info(
            f"reference pass: {len(table.entries)} examples, {'read from' if hit else 'computed and stored in'} "
            f"{path if path is not None else '(no cache)'}, {self.reference_seconds:.2f} s"
        )

    def batch_reference(self, batch: Dict[str, Tensor]) -> Tuple[Optional[Dict[str, Tensor]], Optional[Tensor]]:
        """The reference statistics ``name -> (B, T)`` of a batch and, with a frozen copy, its logits."""
        if not self.needs_reference:
            return None, None
        if self._frozen:
            frozen = self._frozen[0]
            if next(frozen.parameters()).device != self.device:
                frozen.to(self.device)
            return frozen_reference(frozen, batch, self.hparams.top_k)
        if self.reference_table is None:
            raise ValueError("the reference statistics are missing: the model was built outside a Trainer with a DataModule")
        return self.reference_table.batch_reference(batch), None

    def setup(self, stage: str) -> None:
        for prefix in ("val", "test"):
            for name in self._eval_names():
                key = f"{prefix}_{name}"
                if key not in self.eval_metrics:
                    self.eval_metrics[key] = self._new_metric()
        check_strategy_options(
            type(self.trainer.strategy).__name__, chunk_size=self.hparams.chunk_size, loss_normalization=self.hparams.loss_normalization
        )

    #: Whether the model was shown to keep packed sequences apart (checked on the first packed batch).
    _packing_checked = False

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, position_ids: Optional[Tensor] = None) -> Tensor:
        """Return the logits ``(B, T, V)``. Packed batches (``data.init_args.packing``) come with
        ``position_ids`` that restart per conversation and no ``attention_mask``."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits

    def token_stats(self, batch: Dict[str, Tensor], *, grad_norm: bool = False) -> Tuple[TokenStats, Tensor, Tensor]:
        """Run the model on a batch; return the supervised tokens' statistics, their gate weights and
        ``sum(weights * ce)`` plus, with ``reference_kl_coef``, ``beta * sum(KL)`` (the only one of the
        three with gradient). ``stats.reference`` holds the base model's statistics when the gate or
        the KL term needs them (and ``kl``, the per-token KL, with the KL term)."""
        hp = self.hparams
        full = hp.log_full_entropy or self.gate.needs_full_entropy
        position_ids = batch.get("position_ids")  # set in packed batches
        if position_ids is not None and not self._packing_checked:
            check_packing_support(self.model, rows=min(2, position_ids.shape[0]))
            self._packing_checked = True
        reference, ref_logits = self.batch_reference(batch)
        stats, weights, total, logits = causal_lm_statistics(
            self.model,
            batch,
            self.gate,
            top_k=hp.top_k,
            chunk_size=hp.chunk_size,
            transform=self.logit_transform,
            full_entropy=full,
            grad_norm=grad_norm,
            reference=reference,
        )
        if hp.reference_kl_coef > 0 and ref_logits is not None and logits is not None:  # the KL needs the plain path
            kl = token_kl(logits, ref_logits, batch["labels"], hp.reference_kl_direction)  # (N,)
            stats.reference = dict(stats.reference or {}, kl=kl.detach())
            total = total + hp.reference_kl_coef * kl.sum()
        return stats, weights, total

    # ---- training ------------------------------------------------------------------------------

    def _keep_metric_precision(self) -> None:
        # bf16-true/fp16-true precision casts the whole module, metric states included; a bf16 running
        # sum stops growing once a batch is below half its ulp. The sums stay float64 (MPS lacks it).
        dtype = torch.float32 if self.device.type == "mps" else torch.float64
        for metric in [self.train_metrics, *self.eval_metrics.values()]:
            metric.set_dtype(dtype)

    def on_fit_start(self) -> None:
        # ddp_spawn pickles the module into each rank, and torch.multiprocessing moves the metric's
        # state tensors (made in __init__) to shared memory: every rank would add into one storage
        # until the first reset, so the first step's train/* summed the ranks twice. Fresh states.
        self.train_metrics.reset()
        self._keep_metric_precision()

    def on_validation_start(self) -> None:
        self._keep_metric_precision()

    def on_test_start(self) -> None:
        self._keep_metric_precision()

    def on_train_start(self) -> None:
        # Log the first step after this one (also right after a resume), with all its micro-batches.
        self._last_logged_step = self.trainer.global_step

    def training_step(self, batch: Dict[str, Tensor], batch_idx: int) -> Tensor:
        stats, weights, weighted_sum = self.token_stats(batch)
        # A device flag, read only when the step's check fails (reading it here would sync every batch).
        self.nonfinite.record(batch_idx, weighted_sum, batch.get("sources"))
        self.train_metrics.update(stats, weights)
        if stats.reference is not None and "kl" in stats.reference and stats.num_tokens:
            self.log("train/kl", stats.reference["kl"].mean(), on_step=True, on_epoch=False, batch_size=stats.num_tokens)
        if self.hparams.loss_normalization == "micro_batch":
            return weighted_sum / max(stats.num_tokens, 1)
        strategy = self.trainer.strategy
        return self.normalizer.micro_batch_loss(
            weighted_sum,
            stats.num_tokens,
            accumulate=self.trainer.accumulate_grad_batches,
            world_size=self.trainer.world_size,
            reduce_sum=lambda x: strategy.reduce(x, reduce_op="sum"),
            reduce_max=lambda x: strategy.reduce(x, reduce_op="max"),
        )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._step_lr = optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler moves after)
        self._normalise_step_gradients()
        self._skip_nonfinite_step()

    def _normalise_step_gradients(self) -> None:
        if self.hparams.loss_normalization != "step":
            return
        strategy = self.trainer.strategy
        scale = self.normalizer.gradient_scale(
            accumulate=self.trainer.accumulate_grad_batches,
            world_size=self.trainer.world_size,
            reduce_sum=lambda x: strategy.reduce(x, reduce_op="sum"),
            device=self.device,
        )
        if scale is not None:
            scale_gradients(self.parameters(), scale)

    def _skip_nonfinite_step(self) -> None:
        """Skip the optimizer step if any rank's loss or gradient is non-finite; stop past the limit.

        Lightning still steps the LR scheduler and counts the step in ``global_step``: the schedule
        stays a function of ``global_step``, as a resumed run expects, and a skipped step costs its
        data and its share of the schedule, nothing else.
        """
        params = [p for p in self.parameters() if p.grad is not None]
        strategy, world_size = self.trainer.strategy, self.trainer.world_size
        bad = self.nonfinite.step_is_bad(
            [p.grad for p in params],
            # Under a GradScaler (fp16) inf gradients are the scaler's to skip.
            check_grads=getattr(self.trainer.precision_plugin, "scaler", None) is None,
            reduce_sum=(lambda x: strategy.reduce(x, reduce_op="sum")) if world_size > 1 else (lambda x: x),
            device=self.device,
        )
        if not bad:
            return
        message = self.nonfinite.skip(
            params, global_step=self.trainer.global_step, epoch=self.current_epoch, rank=self.global_rank, world_size=world_size
        )
        # Straight to the loggers, at this step: self.log would hold the value until Lightning's next
        # log_every_n_steps flush and record it at that later step.
        for logger in self.loggers:
            logger.log_metrics({"train/skipped_steps": float(self.skipped_steps)}, step=self.trainer.global_step)
        self.train_metrics.reset()  # the step's statistics hold the NaN; it is not logged
        self.nonfinite.stop_if_exhausted(message)
        warnings.warn(message, stacklevel=2)  # on every rank: the rank with the bad batch names it

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # global_step moved: an optimizer step ended with this micro-batch, so the metric holds exactly
        # the tokens of that step. Lightning flushes these values on its log_every_n_steps cadence.
        if self.trainer.global_step == self._last_logged_step:
            return
        self._last_logged_step = self.trainer.global_step
        if not self.train_metrics.update_called:
            return
        values = self.train_metrics.compute()
        self.train_metrics.reset()
        if values["tokens"] > 0:
            self.log_dict({f"train/{k}": v for k, v in values.items()}, on_step=True, on_epoch=False)
        if self._step_lr is not None:
            self.log("train/lr", self._step_lr, on_step=True, on_epoch=False)

    # ---- evaluation ----------------------------------------------------------------------------

    def _eval_names(self) -> List[str]:
        datamodule = getattr(self.trainer, "datamodule", None)
        return list(getattr(datamodule, "val_names", ["domain"]))

    def _eval_step(self, prefix: str, batch: Dict[str, Tensor], dataloader_idx: int) -> Dict[str, Any]:
        stats, weights, _ = self.token_stats(batch, grad_norm=self.eval_grad_norm)
        name = self._eval_names()[dataloader_idx]
        self.eval_metrics[f"{prefix}_{name}"].update(stats, weights)
        # Callbacks receive these as ``outputs`` in on_{validation,test}_batch_end (diagnostics).
        return {"stats": stats, "weights": weights, "name": name}

    def _eval_epoch_end(self, prefix: str) -> None:
        for name in self._eval_names():
            metric = self.eval_metrics[f"{prefix}_{name}"]
            if not metric.update_called:  # a loader that produced no batch
                continue
            values = metric.compute()
            metric.reset()
            if values["tokens"] > 0:
                self.log_dict({f"{prefix}/{name}/{k}": v for k, v in values.items()}, add_dataloader_idx=False)

    def validation_step(self, batch: Dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> Dict[str, Any]:
        """Update ``val/<name>/*`` and return ``{"stats", "weights", "name"}`` for callbacks."""
        return self._eval_step("val", batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: Dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> Dict[str, Any]:
        """Update ``test/<name>/*`` and return ``{"stats", "weights", "name"}`` for callbacks."""
        return self._eval_step("test", batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch: Dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> Dict[str, Tensor]:
        """Per-example means over the supervised tokens: ce, label_prob, topk_entropy, weight, tokens."""
        stats, weights, _ = self.token_stats(batch)
        return per_example_means(stats, weights, batch["labels"])

    # ---- optimisation --------------------------------------------------------------------------

    def configure_optimizers(self) -> Dict[str, Any]:
        hp = self.hparams
        return adamw_warmup_cosine(
            self.parameters(),
            lr=hp.learning_rate,
            weight_decay=hp.weight_decay,
            betas=hp.adam_betas,
            eps=hp.adam_eps,
            total_steps=self.trainer.estimated_stepping_batches,
            warmup_ratio=hp.warmup_ratio,
            min_lr_ratio=hp.min_lr_ratio,
        )

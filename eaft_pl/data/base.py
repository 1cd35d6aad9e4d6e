"""The base DataModule: subclass it and supply conversations; tokenisation, masking, truncation and
collation live here once."""

from __future__ import annotations

from functools import partial
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Sampler

from eaft_pl.data.chat import (
    Conversation,
    DataError,
    EncodedExample,
    ExampleStats,
    SplitSummary,
    collate,
    encode_conversation,
    pad_token_id,
)
from eaft_pl.data.packing import collate_packed, pack_examples, packing_stats
from eaft_pl.data.sampling import ResumableSampler
from eaft_pl.models.loading import load_tokenizer
from eaft_pl.models.templates import resolve_chat_template

__all__ = ["ChatDataModule"]


class ChatDataModule(pl.LightningDataModule):
    """Base class of every eaft-pl DataModule: chat conversations in, padded batches out.

    A subclass implements :meth:`load_conversations` (and, for several validation sets,
    :attr:`val_names`); everything else is shared. Batches hold ``input_ids``, ``attention_mask``
    and ``labels`` (-100 outside assistant turns); packed training batches (``packing: true``) hold
    ``position_ids`` instead of ``attention_mask`` (:mod:`eaft_pl.data.packing`).

    Examples that lose every supervised token to truncation are dropped, counted and reported in
    :attr:`summary` (logged to MLflow as ``data_summary.json``), never trained on silently.

    Args:
        tokenizer_name_or_path: Local folder or hub id of the tokenizer (a fast tokenizer).
        max_length: Truncate conversations to this many tokens (on the right).
        batch_size: Micro-batch size per device for training.
        eval_batch_size: Micro-batch size for validation/test; defaults to ``batch_size``.
        num_workers: DataLoader worker processes.
        chat_template: A chat template that replaces the tokenizer's own (needed when the tokenizer
            has none, as a pretrained model's): a Jinja template, or the name of a built-in one,
            ``chatml`` or ``gemma`` (:mod:`eaft_pl.models.templates`).
        pad_to_multiple_of: Pad each batch's length up to a multiple of this (8 helps tensor cores).
        trust_remote_code: Allow the tokenizer's own Python code from its folder/hub repo to run.
        packing: Pack several training conversations into each row of up to ``max_length`` tokens
            (best-fit decreasing, :mod:`eaft_pl.data.packing`), with position ids that restart per
            conversation so that none attends to another: the loss, its statistics and gradients
            are those of the unpacked data, with far less padding. ``batch_size`` then counts rows.
            Validation and test batches are not packed. Off by default.
    """

    def __init__(
        self,
        tokenizer_name_or_path: str,
        max_length: int = 2048,
        batch_size: int = 8,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        chat_template: Optional[str] = None,
        pad_to_multiple_of: Optional[int] = None,
        trust_remote_code: bool = False,
        packing: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("max_length", max_length), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"data.init_args.{name} must be >= 1, got {value}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"data.init_args.eval_batch_size must be >= 1, got {eval_batch_size}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"data.init_args.pad_to_multiple_of must be >= 1 or null, got {pad_to_multiple_of}")
        if num_workers < 0:
            raise ValueError(f"data.init_args.num_workers must be >= 0 (0 loads in the main process), got {num_workers}")
        self.tokenizer_name_or_path = tokenizer_name_or_path
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        #: The Jinja template (a name given is resolved here), or None for the tokenizer's own.
        self.chat_template = resolve_chat_template(chat_template, "data.init_args.chat_template")
        self.pad_to_multiple_of = pad_to_multiple_of
        self.trust_remote_code = trust_remote_code
        self.packing = packing
        self.tokenizer: Any = None
        #: The encoded examples of every split, never packed (the reference pass, the cohort callback
        #: and ``analyze`` read them one conversation at a time).
        self.datasets: Dict[str, Sequence[EncodedExample]] = {}
        #: The training rows when ``packing`` is on: lists of examples of at most ``max_length`` tokens.
        self.packed_train: List[List[EncodedExample]] = []
        self.summary: Dict[str, Dict[str, Any]] = {}
        self._train_sampler: Optional[ResumableSampler] = None
        self._train_sampler_state: Optional[Dict[str, Any]] = None

    # ---- what a subclass supplies ------------------------------------------------------------------

    def load_conversations(self, split: str) -> Optional[List[Conversation]]:
        """Return the conversations of ``split``, or None if it has none.

        Splits are ``"train"``, ``"test"`` and one per validation set: ``"val"`` for the first name
        of :attr:`val_names` and ``"val:<name>"`` for the others.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement load_conversations(split)")

    @property
    def val_names(self) -> List[str]:
        """Names of the validation dataloaders, used in metric names (``val/<name>/ce``)."""
        return ["domain"]

    def _val_splits(self) -> List[str]:
        return ["val" if i == 0 else f"val:{name}" for i, name in enumerate(self.val_names)]

    # ---- shared machinery --------------------------------------------------------------------------

    def _ensure_tokenizer(self) -> None:
        if self.tokenizer is not None:
            return
        tok = load_tokenizer(self.tokenizer_name_or_path, trust_remote_code=self.trust_remote_code)
        if self.chat_template is None and not getattr(tok, "chat_template", None):
            raise DataError(
                f"the tokenizer at {self.tokenizer_name_or_path!r} has no chat template (pretrained, not "
                "instruction-tuned models such as gemma3-270m ship none); set data.init_args.chat_template to a "
                "Jinja template or a built-in one's name (chatml, gemma)"
            )
        if not getattr(tok, "is_fast", False):
            raise DataError(
                f"the tokenizer at {self.tokenizer_name_or_path!r} is not a fast tokenizer; eaft-pl needs "
                "character offsets to find assistant tokens (save it with a tokenizer.json)"
            )
        if self.chat_template is not None:
            # The tokenizer then renders as the data was rendered, for whatever else reads it (generation).
            tok.chat_template = self.chat_template
        self.tokenizer = tok

    @property
    def pad_token_id(self) -> int:
        self._ensure_tokenizer()
        return pad_token_id(self.tokenizer)

    def encode_split(self, split: str, conversations: List[Conversation]) -> List[EncodedExample]:
        """Tokenise a split, drop (and count) examples left with no supervised token."""
        self._ensure_tokenizer()
        encoded = [encode_conversation(self.tokenizer, c, self.max_length, self.chat_template) for c in conversations]
        kept = self.summarise_split(split, (e.stats for e in encoded))
        return [encoded[i] for i in kept]

    def summarise_split(self, split: str, examples: Iterable[ExampleStats]) -> List[int]:
        """The drop policy of every DataModule, on a split's already-encoded examples: count them into
        :attr:`summary`, warn about those left with no supervised token and return the indices of the
        others.

        Raises:
            DataError: no example is left.
        """
        summary = SplitSummary()
        kept = [i for i, example in enumerate(examples) if summary.add(example)]
        self.summary[split] = summary.as_dict()
        if summary.dropped_no_supervised_tokens:
            rank_zero_warn(
                f"{split}: dropped {summary.dropped_no_supervised_tokens} of {summary.examples} examples that "
                f"kept no assistant token after truncation to max_length={self.max_length} "
                f"(first: {', '.join(summary.dropped_sources[:3])}); raise data.init_args.max_length to keep them"
            )
        if not kept:
            raise DataError(
                f"{split}: no example is left after dropping those without supervised tokens "
                f"({summary.examples} read, first: {', '.join(summary.dropped_sources[:3])}); raise "
                f"data.init_args.max_length (now {self.max_length}) or shorten the prompts"
            )
        rank_zero_info(
            f"{split}: {summary.kept} examples, {summary.supervised_tokens} supervised of {summary.tokens} tokens, "
            f"{summary.truncated} truncated"
        )
        return kept

    def load_split(self, split: str) -> Optional[Sequence[EncodedExample]]:
        """The encoded examples of ``split``, or None if it has none: :meth:`load_conversations`
        then :meth:`encode_split`. Override it to encode another way (see ``HFChatDataModule``)."""
        conversations = self.load_conversations(split)
        return None if conversations is None else self.encode_split(split, conversations)

    def _stage_splits(self) -> Dict[str, Tuple[str, ...]]:
        vals = tuple(self._val_splits())
        return {"fit": ("train", *vals), "validate": vals, "test": ("test",), "predict": ("val",)}

    def splits_for(self, stage: Optional[str]) -> Tuple[str, ...]:
        """The splits ``setup(stage)`` loads: those the stage uses, or all for an unknown/no stage."""
        every = ("train", *self._val_splits(), "test")
        return self._stage_splits().get(stage, every) if stage else every

    def setup(self, stage: Optional[str] = None) -> None:
        vals = tuple(self._val_splits())
        wanted = self._stage_splits()
        for split in self.splits_for(stage):
            if split in self.datasets:
                continue
            examples = self.load_split(split)
            if examples is None:
                required = split == "train" or split in vals[1:] or stage in ("validate", "test", "predict")
                if required and split in wanted.get(stage or "fit", ()):
                    raise DataError(f"{type(self).__name__} has no {split} data, which `{stage}` needs")
                continue
            self.datasets[split] = examples
        if self.packing and "train" in self.datasets and not self.packed_train:
            self.packed_train = self._pack(self.datasets["train"])

    def _pack(self, examples: Sequence[EncodedExample]) -> List[List[EncodedExample]]:
        rows = pack_examples(examples, self.max_length)
        stats = packing_stats(rows, self.max_length)
        self.summary.setdefault("train", {})["packing"] = stats.as_dict()
        rank_zero_info(
            f"train: packed {stats.examples} examples into {stats.rows} rows of at most {self.max_length} tokens "
            f"(fill ratio {stats.fill_ratio:.1%})"
        )
        return rows

    def _train_rows(self) -> Sequence[Any]:
        """What a training batch is drawn from: conversations, or packed rows of them."""
        return self.packed_train if self.packing else self.datasets["train"]

    def _loader(self, split: str, shuffle: bool, sampler: Optional[Sampler] = None) -> DataLoader:
        packed = self.packing and split == "train"
        collate_fn = collate_packed if packed else collate
        return DataLoader(
            self._train_rows() if split == "train" else self.datasets[split],
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=partial(collate_fn, pad_token_id=self.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of),
        )

    def train_dataloader(self) -> DataLoader:
        # A seeded sampler whose position is saved in checkpoints (state_dict below): a run resumed
        # mid-epoch sees the batches the interrupted run had not reached yet, in the same order.
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        self._train_sampler = ResumableSampler(self._train_rows(), num_replicas=world, rank=rank)
        if self._train_sampler_state is not None:
            self._train_sampler.load_state_dict(self._train_sampler_state)
            self._train_sampler_state = None
        return self._loader("train", shuffle=False, sampler=self._train_sampler)

    def state_dict(self) -> Dict[str, Any]:
        """The training sampler's position (saved in checkpoints by Lightning)."""
        if self._train_sampler is None or self.trainer is None:
            return {}
        # Batches of this epoch that ran their training step, at any of Lightning's save points
        # (after a batch, after validation, at the end of an epoch or of an interrupted run).
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"train_sampler": self._train_sampler.state_dict(consumed_samples=done * self.batch_size)}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Keep the sampler position for the next :meth:`train_dataloader`."""
        self._train_sampler_state = state_dict.get("train_sampler")

    def val_dataloader(self) -> Any:
        loaders = [self._loader(split, shuffle=False) for split in self._val_splits() if split in self.datasets]
        if not loaders:
            return []
        if "val" not in self.datasets:  # loaders are matched to val_names by position
            raise DataError(f"{type(self).__name__} has later validation sets but not the first, '{self.val_names[0]}'")
        return loaders[0] if len(loaders) == 1 else loaders

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

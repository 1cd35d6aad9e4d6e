"""The base DataModule: subclass it and supply conversations; tokenisation, masking, truncation and
collation live here once."""

from __future__ import annotations

from functools import partial
from typing import Any, Dict, List, Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from eaft_pl.data.chat import (
    Conversation,
    DataError,
    EncodedExample,
    SplitSummary,
    collate,
    encode_conversation,
    pad_token_id,
)
from eaft_pl.hub import load_tokenizer

__all__ = ["ChatDataModule"]


class ChatDataModule(pl.LightningDataModule):
    """Base class of every eaft-pl DataModule: chat conversations in, padded batches out.

    A subclass implements :meth:`load_conversations` (and, for several validation sets,
    :attr:`val_names`); everything else is shared. Batches hold ``input_ids``, ``attention_mask``
    and ``labels`` (-100 outside assistant turns).

    Examples that lose every supervised token to truncation are dropped, counted and reported in
    :attr:`summary` (logged to MLflow as ``data_summary.json``), never trained on silently.

    Args:
        tokenizer_name_or_path: Local folder or hub id of the tokenizer (a fast tokenizer).
        max_length: Truncate conversations to this many tokens (on the right).
        batch_size: Micro-batch size per device for training.
        eval_batch_size: Micro-batch size for validation/test; defaults to ``batch_size``.
        num_workers: DataLoader worker processes.
        chat_template: A Jinja chat template that replaces the tokenizer's own (needed when the
            tokenizer has none).
        pad_to_multiple_of: Pad each batch's length up to a multiple of this (8 helps tensor cores).
        trust_remote_code: Allow the tokenizer's own Python code from its folder/hub repo to run.
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
        self.chat_template = chat_template
        self.pad_to_multiple_of = pad_to_multiple_of
        self.trust_remote_code = trust_remote_code
        self.tokenizer: Any = None
        self.datasets: Dict[str, List[EncodedExample]] = {}
        self.summary: Dict[str, Dict[str, Any]] = {}

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
                f"the tokenizer at {self.tokenizer_name_or_path!r} has no chat template; set "
                "data.init_args.chat_template to a Jinja template"
            )
        if not getattr(tok, "is_fast", False):
            raise DataError(
                f"the tokenizer at {self.tokenizer_name_or_path!r} is not a fast tokenizer; eaft-pl needs "
                "character offsets to find assistant tokens (save it with a tokenizer.json)"
            )
        self.tokenizer = tok

    @property
    def pad_token_id(self) -> int:
        self._ensure_tokenizer()
        return pad_token_id(self.tokenizer)

    def encode_split(self, split: str, conversations: List[Conversation]) -> List[EncodedExample]:
        """Tokenise a split, drop (and count) examples left with no supervised token."""
        self._ensure_tokenizer()
        summary = SplitSummary(examples=len(conversations))
        kept = []
        for conv in conversations:
            ex = encode_conversation(self.tokenizer, conv, self.max_length, self.chat_template)
            summary.truncated += ex.truncated
            summary.tokens += len(ex.input_ids)
            n = ex.num_supervised
            if n == 0:
                summary.dropped_no_supervised_tokens += 1
                summary.dropped_sources.append(conv.source)
                continue
            summary.supervised_tokens += n
            kept.append(ex)
        summary.kept = len(kept)
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

    def setup(self, stage: Optional[str] = None) -> None:
        vals = tuple(self._val_splits())
        wanted = {"fit": ("train", *vals), "validate": vals, "test": ("test",), "predict": ("val",)}
        for split in wanted.get(stage, ("train", *vals, "test")) if stage else ("train", *vals, "test"):
            if split in self.datasets:
                continue
            conversations = self.load_conversations(split)
            if conversations is None:
                required = split == "train" or split in vals[1:] or stage in ("validate", "test", "predict")
                if required and split in wanted.get(stage or "fit", ()):
                    raise DataError(f"{type(self).__name__} has no {split} data, which `{stage}` needs")
                continue
            self.datasets[split] = self.encode_split(split, conversations)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=partial(collate, pad_token_id=self.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

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

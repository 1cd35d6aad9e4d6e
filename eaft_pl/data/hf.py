"""Chat data from Hugging Face ``datasets``: a hub dataset, a builder over local files (``json``,
``parquet``, ``csv``), a folder of data files or a ``save_to_disk`` folder.

Each split is tokenised once with ``Dataset.map`` under a fingerprint of everything that decides the
tokens (the loaded split, the tokenizer, the chat template, ``max_length``, the layout options and
the encoding code), so a second run with the same settings reads the tokens from the ``datasets``
cache instead of tokenising again. The encoded split stays a memory-mapped Arrow table.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union, overload

from eaft_pl.data.base import ChatDataModule
from eaft_pl.data.chat import DataError, EncodedExample, ExampleStats, encode_conversation
from eaft_pl.data.layouts import LayoutName, RecordLayout

__all__ = ["HFChatDataModule", "EncodedRows"]

DataFiles = Union[str, List[str], Dict[str, Union[str, List[str]]]]

# The code that turns a record into tokens: a change to it must not reuse tokens cached before.
_ENCODING_CODE = [Path(__file__).with_name(name) for name in ("chat.py", "layouts.py", "hf.py")]

_STATS_COLUMNS = ["source", "tokens", "supervised", "truncated"]


def _encoded_features() -> Any:
    from datasets import Features, List as ListOf, Value

    # int32 halves the cache on disk; token ids and -100 fit.
    return Features(
        {
            "input_ids": ListOf(Value("int32")),
            "labels": ListOf(Value("int32")),
            "source": Value("string"),
            "truncated": Value("bool"),
            "tokens": Value("int32"),
            "supervised": Value("int32"),
        }
    )


class EncodedRows(Sequence[EncodedExample]):
    """A tokenised ``datasets.Dataset`` as a sequence of :class:`EncodedExample`, read row by row from
    its memory-mapped table (what the base class's DataLoader and the reference pass index)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    @staticmethod
    def _example(row: Dict[str, Any]) -> EncodedExample:
        return EncodedExample(row["input_ids"], row["labels"], row["source"], row["truncated"])

    @overload
    def __getitem__(self, index: int) -> EncodedExample: ...

    @overload
    def __getitem__(self, index: slice) -> List[EncodedExample]: ...

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        return self._example(self.dataset[int(index) % len(self)])

    def __iter__(self) -> Iterator[EncodedExample]:
        for row in self.dataset:
            yield self._example(row)


class _Encoder:
    """The ``Dataset.map`` function: one record -> token ids, labels and the summary's counts."""

    def __init__(
        self, tokenizer: Any, max_length: int, chat_template: Optional[str], layout: RecordLayout, label: str,
        positions: Optional[List[int]],
    ) -> None:  # fmt: skip
        self.tokenizer, self.max_length, self.chat_template = tokenizer, max_length, chat_template
        self.layout, self.label, self.positions = layout, label, positions

    def __call__(self, record: Dict[str, Any], index: int) -> Dict[str, Any]:
        # Errors name the row of the split the user asked for, also after max_train_examples sampled it.
        source = f"{self.label}:{self.positions[index] if self.positions else index}"
        conversation = self.layout.to_conversation(record, source)
        ex = encode_conversation(self.tokenizer, conversation, self.max_length, self.chat_template)
        return {
            "input_ids": ex.input_ids,
            "labels": ex.labels,
            "source": source,
            "truncated": ex.truncated,
            "tokens": len(ex.input_ids),
            "supervised": ex.num_supervised,
        }


def _is_saved_dataset(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file())


class HFChatDataModule(ChatDataModule):
    """Chat data loaded with ``datasets.load_dataset`` (or ``load_from_disk``), in any layout of
    :mod:`eaft_pl.data.layouts`, tokenised once and cached by ``datasets``.

    Rows that lose every assistant token to truncation are dropped and counted as in every
    eaft-pl DataModule. Error messages name the row as ``<dataset>[<split>]:<index>``, the index
    counted within the split expression (``train[95%:]``: 0 is its first row).

    Args:
        path: What ``datasets.load_dataset`` loads: a hub id (``org/name``), a builder over local
            files (``json``, ``parquet``, ``csv`` with ``data_files``) or a folder of data files. A
            folder written by ``Dataset.save_to_disk``/``DatasetDict.save_to_disk`` is read with
            ``datasets.load_from_disk`` instead.
        name: The dataset's configuration (subset), if it has several.
        data_files: Files for a builder path: one path or glob, a list, or ``{split: files}``.
        data_dir: Sub-folder of the dataset to read the data files from.
        revision: Git revision (branch, tag, commit) of a hub dataset; pin it for reproducible runs.
        train_split: Split expression of the training data, e.g. ``train`` or ``train[:95%]``.
        val_split: Split expression of the validation data (``val/domain/*``), e.g. ``train[95%:]``
            or ``validation``; none when unset.
        test_split: Split expression for ``eaft-pl test``; none when unset.
        max_train_examples: Train on this many rows of ``train_split``, a random subset drawn with
            ``shuffle_seed`` (the same rows on every run and machine); all rows when unset or larger.
        shuffle_seed: Seed of the ``max_train_examples`` subset.
        layout: Record layout: ``auto`` (detected per row), ``messages``, ``sharegpt``, ``alpaca`` or
            ``prompt_response``.
        columns: Renamed fields, layout field -> your column, e.g. ``{"prompt": "question",
            "response": "answer"}`` or ``{"messages": "dialog"}``.
        system_prompt: A system turn prepended to every conversation that has none.
        cache_dir: Where ``datasets`` keeps downloads, prepared tables and the tokenised cache;
            its default (``HF_DATASETS_CACHE``) when unset.
        num_proc: Processes for preparing the dataset and for tokenising it.
        streaming: Not supported (see the error it raises); kept so a config that sets it gets a
            clear answer instead of an unknown-key error.
        **kwargs: Options of :class:`~eaft_pl.data.ChatDataModule` (tokenizer, max_length, batch sizes, ...).
    """

    def __init__(
        self,
        path: str,
        name: Optional[str] = None,
        data_files: Optional[DataFiles] = None,
        data_dir: Optional[str] = None,
        revision: Optional[str] = None,
        train_split: str = "train",
        val_split: Optional[str] = None,
        test_split: Optional[str] = None,
        max_train_examples: Optional[int] = None,
        shuffle_seed: int = 0,
        layout: LayoutName = "auto",
        columns: Optional[Dict[str, str]] = None,
        system_prompt: Optional[str] = None,
        cache_dir: Optional[str] = None,
        num_proc: Optional[int] = None,
        streaming: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if streaming:
            raise ValueError(
                "data.init_args.streaming: true is not supported: eaft-pl tokenises a split once into a "
                "cached, memory-mapped table (shuffled by index every epoch, with drops counted before "
                "training). To use part of a large dataset, set data.init_args.train_split to a slice "
                "such as 'train[:20000]', or data.init_args.max_train_examples"
            )
        if max_train_examples is not None and max_train_examples < 1:
            raise ValueError(f"data.init_args.max_train_examples must be >= 1, got {max_train_examples}")
        if num_proc is not None and num_proc < 1:
            raise ValueError(f"data.init_args.num_proc must be >= 1, got {num_proc}")
        if _is_saved_dataset(path):
            given = [k for k, v in (("name", name), ("data_files", data_files), ("data_dir", data_dir), ("revision", revision)) if v]
            if given:
                raise ValueError(
                    f"data.init_args.path {path!r} is a save_to_disk folder, which has no {given}; unset "
                    f"{', '.join('data.init_args.' + k for k in given)}"
                )
        self.path, self.name, self.data_files, self.data_dir, self.revision = path, name, data_files, data_dir, revision
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.max_train_examples, self.shuffle_seed = max_train_examples, shuffle_seed
        self.layout = RecordLayout(layout, columns, system_prompt)
        self.cache_dir, self.num_proc = cache_dir, num_proc
        # What a run trained on, for the MLflow `data` tag (eaft_pl.tracking.run_tags reads files["train"]).
        self.files = {split: self._label(expr) for split, expr in self.splits.items() if expr}

    def _label(self, expr: str) -> str:
        """``<dataset>[<split expression>]``, the prefix of every row's source. ``<dataset>`` is the
        file the split reads when there is one (what a user recognises), else ``path[:name]``."""
        files = self.data_files
        if isinstance(files, dict):
            split_name = re.fullmatch(r"([\w.-]+)(\[[^\]]*\])?", expr)  # one split, maybe sliced
            files = files.get(split_name.group(1)) if split_name else None
        if isinstance(files, str):
            return f"{files}[{expr}]"
        return f"{self.path}{f':{self.name}' if self.name else ''}[{expr}]"

    # ---- loading -----------------------------------------------------------------------------------

    def _option(self, split: str) -> str:
        return f"data.init_args.{split}_split"

    def _load_raw(self, split: str, expr: str) -> Any:
        import datasets

        try:
            if _is_saved_dataset(self.path):
                return self._load_saved(expr)
            return datasets.load_dataset(
                self.path,
                self.name,
                data_dir=self.data_dir,
                data_files=self.data_files,
                split=expr,
                revision=self.revision,
                cache_dir=self.cache_dir,
                num_proc=self.num_proc,
            )
        except (ValueError, FileNotFoundError) as e:
            raise DataError(f"{self._option(split)}={expr!r} of data.init_args.path={self.path!r}: {e}") from None

    def _load_saved(self, expr: str) -> Any:
        import datasets

        saved = datasets.load_from_disk(self.path)
        if isinstance(saved, datasets.Dataset):
            saved = datasets.DatasetDict({"train": saved})
        parts = [
            saved[i.splitname].select(range(i.from_, i.to))
            for i in datasets.ReadInstruction.from_spec(expr).to_absolute({k: len(v) for k, v in saved.items()})
        ]
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)

    def _subset(self, raw: Any) -> Any:
        """The ``max_train_examples`` rows of ``raw`` drawn with ``shuffle_seed``, in their order, and
        their positions in ``raw`` (None when every row is used)."""
        n = self.max_train_examples
        if n is None or n >= len(raw):
            return raw, None
        positions = sorted(random.Random(self.shuffle_seed).sample(range(len(raw)), n))
        return raw.select(positions), positions

    def _fingerprint(self, raw: Any, label: str) -> str:
        """Everything that decides the tokens. ``raw._fingerprint`` is the ``datasets`` fingerprint of
        the loaded rows (their files, the split expression and any subset), so new data re-tokenises."""
        tok = self.tokenizer
        h = hashlib.sha256()
        parts = [
            raw._fingerprint,
            label,
            self.max_length,
            self.chat_template if self.chat_template is not None else tok.chat_template,
            tok.backend_tokenizer.to_str(),
            tok.special_tokens_map,  # the template sees these (bos_token, eos_token, ...)
            self.layout.describe(),
        ]
        h.update(json.dumps(parts, sort_keys=True, default=str).encode())
        for path in _ENCODING_CODE:
            h.update(path.read_bytes())
        return h.hexdigest()[:32]

    def encoded_split(self, split: str) -> Optional[Any]:
        """The tokenised rows of ``split`` as a ``datasets.Dataset`` (read from the cache when this
        split was tokenised before with the same settings), or None if the split is unset. Nothing
        is dropped yet."""
        expr = self.splits.get(split)
        if expr is None:
            return None
        raw = self._load_raw(split, expr)
        positions = None
        if split == "train":
            raw, positions = self._subset(raw)
        self._ensure_tokenizer()
        label = self._label(expr)
        encoder = _Encoder(self.tokenizer, self.max_length, self.chat_template, self.layout, label, positions)
        return raw.map(
            encoder,
            with_indices=True,
            remove_columns=raw.column_names,
            features=_encoded_features(),
            new_fingerprint=self._fingerprint(raw, label),
            num_proc=self.num_proc,
            desc=f"tokenising {label}",
        )

    def prepare_data(self) -> None:
        """Tokenise the splits the Trainer's stage uses once (on local rank zero of each node), so the
        other processes' ``setup`` reads the tokens from the cache instead of tokenising the same rows
        at the same time."""
        stage = self.trainer.state.fn.value if self.trainer is not None and self.trainer.state.fn else None
        for split in self.splits_for(stage):
            self.encoded_split(split)

    def load_split(self, split: str) -> Optional[EncodedRows]:
        encoded = self.encoded_split(split)
        if encoded is None:
            return None
        counts = encoded.select_columns(_STATS_COLUMNS).to_dict()
        kept = self.summarise_split(split, (ExampleStats(*row) for row in zip(*(counts[c] for c in _STATS_COLUMNS))))
        if len(kept) < len(encoded):
            encoded = encoded.select(kept)
        return EncodedRows(encoded.select_columns(["input_ids", "labels", "source", "truncated"]))

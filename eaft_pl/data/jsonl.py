"""Chat conversations from JSON Lines files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from eaft_pl.data.base import ChatDataModule
from eaft_pl.data.chat import Conversation, DataError
from eaft_pl.data.layouts import LayoutName, RecordLayout

__all__ = ["ChatJsonlDataModule", "read_chat_jsonl"]


def read_chat_jsonl(path: str, layout: Optional[RecordLayout] = None) -> List[Conversation]:
    """Read a chat JSONL file; blank lines are skipped, anything malformed raises a
    :class:`DataError` naming ``file:line``. ``layout`` says how a line becomes messages (default:
    detect each line's layout)."""
    layout = layout or RecordLayout()
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: no such file")
    conversations = []
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            source = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{source}: not valid UTF-8 ({e.reason} at byte {e.start}); re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{source}: invalid JSON ({e.msg} at column {e.colno}); one object per line") from None
            if not isinstance(record, dict):
                raise DataError(f"{source}: expected a JSON object per line, got {type(record).__name__}")
            conversations.append(layout.to_conversation(record, source))
    if not conversations:
        raise DataError(f"{path}: the file holds no conversation")
    return conversations


class ChatJsonlDataModule(ChatDataModule):
    """Chat data from JSONL files: one conversation per line, in any layout of
    :mod:`eaft_pl.data.layouts` (``{"messages": [...]}``, ShareGPT ``conversations``, Alpaca
    ``instruction``/``input``/``output``, ``{"prompt": ..., "response": ...}``); the loss covers every
    assistant turn.

    Args:
        train_file: JSONL file of training conversations.
        val_file: JSONL file of validation conversations (logged as ``val/domain/*``).
        test_file: JSONL file for ``eaft-pl test``.
        layout: Record layout: ``auto`` (detected per line), ``messages``, ``sharegpt``, ``alpaca`` or
            ``prompt_response``.
        columns: Renamed fields, layout field -> your key, e.g. ``{"prompt": "question", "response":
            "answer"}`` or ``{"messages": "dialog"}``.
        system_prompt: A system turn prepended to every conversation that has none.
        **kwargs: Options of :class:`~eaft_pl.data.ChatDataModule` (tokenizer, max_length, batch sizes, ...).
    """

    def __init__(
        self,
        train_file: Optional[str] = None,
        val_file: Optional[str] = None,
        test_file: Optional[str] = None,
        layout: LayoutName = "auto",
        columns: Optional[Dict[str, str]] = None,
        system_prompt: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.layout = RecordLayout(layout, columns, system_prompt)

    def load_conversations(self, split: str) -> Optional[List[Conversation]]:
        path = self.files.get(split)
        return read_chat_jsonl(path, self.layout) if path else None

"""Chat conversations from JSON Lines files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

from eaft_pl.data.base import ChatDataModule
from eaft_pl.data.chat import Conversation, DataError, did_you_mean

__all__ = ["ChatJsonlDataModule", "read_chat_jsonl", "record_to_messages"]

#: The keys a record's layout reads; any other key (ids, tags) is ignored unless it looks like a typo of one.
RECORD_KEYS = ("messages", "prompt", "response", "system")


def _check_near_misses(record: dict, source: str) -> None:
    """Refuse a key that is not read but is a near miss of one that is (``sytem``): ignoring it would
    silently drop the system prompt."""
    absent = [k for k in RECORD_KEYS if k not in record]
    for key in record:
        if key in RECORD_KEYS:
            continue
        hint = did_you_mean(key, absent, cutoff=0.85)
        if hint:
            raise DataError(f"{source}: key {key!r} is not read{hint} Rename it, or remove it if it is data of yours")


def record_to_messages(record: Any, source: str) -> List[dict]:
    """Turn one JSON record into chat messages.

    Accepted layouts: ``{"messages": [{"role", "content"}, ...]}`` and
    ``{"prompt": str, "response": str}`` with an optional ``"system": str``. Other keys (ids, tags)
    are ignored.
    """
    if not isinstance(record, dict):
        raise DataError(f"{source}: expected a JSON object per line, got {type(record).__name__}")
    if "messages" in record:
        return record["messages"]  # validated with the others in encode_conversation
    if "prompt" in record and "response" in record:
        _check_near_misses(record, source)
        for key in ("prompt", "response", "system"):
            if key in record and not isinstance(record[key], str):
                raise DataError(f"{source}: '{key}' must be a string, got {type(record[key]).__name__}")
        messages = [{"role": "system", "content": record["system"]}] if "system" in record else []
        return messages + [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["response"]},
        ]
    hints = "".join(did_you_mean(k, [r for r in RECORD_KEYS if r not in record]) for k in record)
    raise DataError(
        f"{source}: found keys {sorted(record)}, expected 'messages' (a list of role/content objects) or "
        f"'prompt' and 'response'{hints}"
    )


def read_chat_jsonl(path: str) -> List[Conversation]:
    """Read a chat JSONL file; blank lines are skipped, anything malformed raises a
    :class:`DataError` naming ``file:line``."""
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
            conversations.append(Conversation(record_to_messages(record, source), source))
    if not conversations:
        raise DataError(f"{path}: the file holds no conversation")
    return conversations


class ChatJsonlDataModule(ChatDataModule):
    """Chat data from JSONL files: one conversation per line, as ``{"messages": [...]}`` or
    ``{"prompt": ..., "response": ...}``; the loss covers every assistant turn.

    Args:
        train_file: JSONL file of training conversations.
        val_file: JSONL file of validation conversations (logged as ``val/domain/*``).
        test_file: JSONL file for ``eaft-pl test``.
        **kwargs: Options of :class:`~eaft_pl.data.ChatDataModule` (tokenizer, max_length, batch sizes, ...).
    """

    def __init__(
        self,
        train_file: Optional[str] = None,
        val_file: Optional[str] = None,
        test_file: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.files = {"train": train_file, "val": val_file, "test": test_file}

    def load_conversations(self, split: str) -> Optional[List[Conversation]]:
        path = self.files.get(split)
        return read_chat_jsonl(path) if path else None

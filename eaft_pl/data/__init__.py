"""DataModules: the shared base and the file-backed implementations."""

from eaft_pl.data.base import ChatDataModule
from eaft_pl.data.chat import Conversation, DataError, EncodedExample, collate, encode_conversation
from eaft_pl.data.jsonl import ChatJsonlDataModule, read_chat_jsonl

__all__ = [
    "ChatDataModule",
    "ChatJsonlDataModule",
    "Conversation",
    "DataError",
    "EncodedExample",
    "collate",
    "encode_conversation",
    "read_chat_jsonl",
]

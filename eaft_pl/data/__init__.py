"""DataModules: the shared base and the file-backed implementations."""

from eaft_pl.data.base import ChatDataModule
from eaft_pl.data.chat import Conversation, DataError, EncodedExample, collate, encode_conversation
from eaft_pl.data.hf import HFChatDataModule
from eaft_pl.data.jsonl import ChatJsonlDataModule, read_chat_jsonl
from eaft_pl.data.layouts import RecordLayout

__all__ = [
    "ChatDataModule",
    "ChatJsonlDataModule",
    "Conversation",
    "DataError",
    "EncodedExample",
    "HFChatDataModule",
    "RecordLayout",
    "collate",
    "encode_conversation",
    "read_chat_jsonl",
]

"""DataModules: the shared base and the file-backed implementations.

The exports are lazy: ``eaft_pl.data.chat`` (templating, masking, collation) is used by the evaluation
tasks and other trainers without importing the Lightning DataModules.
"""

from typing import TYPE_CHECKING

from eaft_pl._lazy import lazy_exports

_LAZY = {
    "ChatDataModule": "eaft_pl.data.base",
    "ChatJsonlDataModule": "eaft_pl.data.jsonl",
    "Conversation": "eaft_pl.data.chat",
    "DataError": "eaft_pl.data.chat",
    "EncodedExample": "eaft_pl.data.chat",
    "HFChatDataModule": "eaft_pl.data.hf",
    "RecordLayout": "eaft_pl.data.layouts",
    "collate": "eaft_pl.data.chat",
    "encode_conversation": "eaft_pl.data.chat",
    "read_chat_jsonl": "eaft_pl.data.jsonl",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from eaft_pl.data.base import ChatDataModule
    from eaft_pl.data.chat import Conversation, DataError, EncodedExample, collate, encode_conversation
    from eaft_pl.data.hf import HFChatDataModule
    from eaft_pl.data.jsonl import ChatJsonlDataModule, read_chat_jsonl
    from eaft_pl.data.layouts import RecordLayout

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)

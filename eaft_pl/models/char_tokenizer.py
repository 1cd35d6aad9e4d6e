"""A character-level tokenizer with a ChatML chat template, built offline.

The quickstart and the tests need a real ``PreTrainedTokenizerFast`` (offsets, chat template,
``save_pretrained``/``from_pretrained``) without any download. Every printable ASCII character is
one token, plus the ChatML control tokens; the template has no ``{% generation %}`` markers, like
Qwen's, so the prefix-rendering path of the data pipeline is what finds the assistant tokens.

Rebuild the shipped copy with ``python -m eaft_pl.models.char_tokenizer data/quickstart/tokenizer``.
"""

from __future__ import annotations

import string
import sys
from typing import Any, Optional

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from eaft_pl.models.templates import CHATML_TEMPLATE

__all__ = ["CHATML_TEMPLATE", "SPECIAL_TOKENS", "build_char_tokenizer"]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]


def build_char_tokenizer(chat_template: Optional[str] = CHATML_TEMPLATE) -> Any:
    """Return a ``PreTrainedTokenizerFast`` over the printable ASCII characters and ChatML tokens."""
    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab[ch] = len(vocab)
    # BPE with no merges splits text into single characters and keeps character offsets.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.add_special_tokens(SPECIAL_TOKENS)
    core.decoder = decoders.Fuse()  # join characters back without the spaces BPE decoding inserts
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = chat_template
    return tok


if __name__ == "__main__":  # pragma: no cover - a maintenance command
    if len(sys.argv) != 2:
        sys.exit("usage: python -m eaft_pl.models.char_tokenizer OUTPUT_DIR")
    build_char_tokenizer().save_pretrained(sys.argv[1])
    print(f"wrote {sys.argv[1]}")

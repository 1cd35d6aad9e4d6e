"""Loading tokenizers and causal LMs from a local folder, a hub id, a GGUF file or the short name of an
installed model package, or building one from a config.

Nothing here downloads unless the user names a hub id and the machine is online; with
``HF_HUB_OFFLINE=1`` a missing model fails at once with the library's own message. GGUF files and
short names go through :func:`eaft_pl.models.gguf.resolve_model_path`: converted once into a cached
Hugging Face folder, which is what every load reads.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from eaft_pl.models.gguf import resolve_model_path, unknown_name_hint

__all__ = ["load_tokenizer", "load_causal_lm", "build_causal_lm", "enable_gradient_checkpointing"]


def _from_pretrained(load: Callable[..., Any], name_or_path: str, **kwargs: Any) -> Any:
    """``load(resolved folder or hub id, **kwargs)``; a bare name that fails to load gets the known
    short names added to the error (a mistyped short name would otherwise read as a hub id)."""
    try:
        return load(resolve_model_path(name_or_path), **kwargs)
    except OSError as err:
        hint = unknown_name_hint(name_or_path)
        if hint is None:
            raise
        raise OSError(f"{err}\n{hint}") from err


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """``AutoTokenizer.from_pretrained`` with remote code off unless asked for. A GGUF file or a model
    package's short name loads from its converted folder (:func:`~eaft_pl.models.gguf.resolve_model_path`)."""
    return _from_pretrained(AutoTokenizer.from_pretrained, name_or_path, trust_remote_code=trust_remote_code)


def _dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None or name == "auto":
        return None
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"model.init_args.torch_dtype: {name!r} is not a torch dtype (use float32, bfloat16, float16)")
    return dtype


def load_causal_lm(
    name_or_path: str, torch_dtype: Optional[str] = None, trust_remote_code: bool = False, attn_implementation: Optional[str] = None
) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` with an explicit dtype and remote code off by default. A
    GGUF file or a model package's short name loads from its converted, float32 folder
    (:func:`~eaft_pl.models.gguf.resolve_model_path`)."""
    kwargs: Dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if torch_dtype is not None:
        kwargs["dtype"] = _dtype(torch_dtype) if torch_dtype != "auto" else "auto"
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    return _from_pretrained(AutoModelForCausalLM.from_pretrained, name_or_path, **kwargs)


def build_causal_lm(config: Dict[str, Any], tokenizer: Any = None, torch_dtype: Optional[str] = None) -> Any:
    """A randomly initialised causal LM from a config dict with a ``model_type`` (e.g. ``llama``).

    Token ids the config leaves out (vocabulary size, pad/bos/eos) are taken from ``tokenizer``.
    """
    config = dict(config)
    if "model_type" not in config:
        raise ValueError("model.init_args.model_config needs a 'model_type' (e.g. llama, qwen2)")
    if tokenizer is not None:
        config.setdefault("vocab_size", len(tokenizer))
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(tokenizer, key, None)
            if value is not None:
                config.setdefault(key, value)
    cfg = AutoConfig.for_model(**config)
    model = AutoModelForCausalLM.from_config(cfg)
    dtype = _dtype(torch_dtype)
    return model.to(dtype) if dtype is not None else model


def enable_gradient_checkpointing(model: Any) -> None:
    """Recompute activations in backward (Hugging Face's implementation), non-reentrant so that it
    works with DDP and frozen inputs; the KV cache, useless in training, is switched off as it
    clashes with checkpointing."""
    # transformers >= 5 renamed the method.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False

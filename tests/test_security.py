"""What loading trusts: remote code stays off unless the user sets ``trust_remote_code``, and no
pickle is read except a Lightning checkpoint the user names."""

import ast
import json

import pytest
import torch

from conftest import REPO, TINY_LLAMA
from eaft_pl import ChatJsonlDataModule, EAFTModule
from eaft_pl.models.loading import build_causal_lm


@pytest.fixture
def model_dir(tmp_path, char_tokenizer):
    torch.manual_seed(0)
    path = tmp_path / "model"
    build_causal_lm(TINY_LLAMA, char_tokenizer).save_pretrained(path)
    char_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def loads(monkeypatch):
    """Records the ``trust_remote_code`` of every model and tokenizer load (the loads still happen)."""
    import transformers

    seen = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        original = cls.from_pretrained

        def record(*args, _original=original, _name=cls.__name__, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code", "absent")))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", record)
    return seen


@pytest.mark.parametrize("trust", [None, True], ids=["default", "set"])
def test_remote_code_runs_only_when_the_user_sets_it(tmp_path, model_dir, loads, trust):
    kwargs = {} if trust is None else {"trust_remote_code": trust}
    module = EAFTModule(model_name_or_path=str(model_dir), **kwargs)
    module.configure_model()
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    ChatJsonlDataModule(train_file=str(train), tokenizer_name_or_path=str(model_dir), **kwargs).setup("fit")
    expected = bool(trust)
    assert loads == [("AutoTokenizer", expected), ("AutoModelForCausalLM", expected), ("AutoTokenizer", expected)]


def calls(tree, name):
    """Every call of an attribute or function called ``name`` in a module's syntax tree."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if (isinstance(func, ast.Attribute) and func.attr == name) or (isinstance(func, ast.Name) and func.id == name):
                yield node


def keyword(call, name):
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_every_load_in_the_package_states_its_trust():
    """A guard for new code: a transformers ``Auto*.from_pretrained`` without an explicit
    ``trust_remote_code`` or a ``torch.load`` without ``weights_only=True`` fails here."""
    problems, seen = [], 0
    for path in sorted((REPO / "eaft_pl").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for call in calls(tree, "from_pretrained"):
            owner = call.func.value if isinstance(call.func, ast.Attribute) else None
            if isinstance(owner, ast.Name) and owner.id.startswith("Auto"):
                seen += 1
                if keyword(call, "trust_remote_code") is None and not any(k.arg is None for k in call.keywords):
                    problems.append(f"{path.name}:{call.lineno}: {owner.id}.from_pretrained without trust_remote_code")
        for call in calls(tree, "load"):
            if isinstance(call.func, ast.Attribute) and isinstance(call.func.value, ast.Name) and call.func.value.id == "torch":
                seen += 1
                value = keyword(call, "weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    problems.append(f"{path.name}:{call.lineno}: torch.load without weights_only=True")
    assert seen >= 3  # hub.py's two loads and the reference cache's torch.load
    assert not problems, problems

"""Shared fixtures. The Hub is unreachable on CI machines: every model and tokenizer is built locally."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


@pytest.fixture(scope="session")
def char_tokenizer():
    from eaft_pl.models.char_tokenizer import build_char_tokenizer

    return build_char_tokenizer()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, char_tokenizer):
    path = tmp_path_factory.mktemp("tokenizer")
    char_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def no_downloads(monkeypatch):
    """Instantiating a shipped config must load no tokenizer, model or dataset: the model is built
    later (configure_model), the data at setup."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a config loaded something while being instantiated: {args}")

    import datasets
    import transformers

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)

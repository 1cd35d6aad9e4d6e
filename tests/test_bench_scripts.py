"""The pure parts of the real-model benchmark scripts (their reports from given measurements); the
measurements themselves (conversions, training steps on real models) are not rerun here."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Dict

import pytest

REPO = Path(__file__).resolve().parents[1]


def _script(name: str) -> Any:
    """Import ``scripts/<name>.py`` as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load(phase: str, converted: bool, total_s: float, rss: float) -> Dict[str, Any]:
    return {
        "model": "m", "phase": phase, "converted": converted, "locate_s": 0.01, "hash_s": 0.4, "convert_s": 60.0 if converted else 0.0,
        "dequantise_s": 30.0 if converted else 0.0, "load_folder_s": 0.2, "total_s": total_s, "peak_rss_mb": rss,
        "parameters": 134_515_008, "vocab_size": 49152, "tokenizer_len": 49152, "chat_template": True,
        "architecture": "llama", "gguf_mb": 98.2, "folder_mb": 513.4,
    }  # fmt: skip


def test_model_load_report_ratios_and_table() -> None:
    bench = _script("bench_model_load")
    report = bench.summarise({"m": {"cold": _load("cold", True, 61.0, 2000.0), "warm": _load("warm", False, 0.61, 800.0)}})
    assert report["ratios"]["m"] == {"cold_over_warm_total": 100.0, "cold_over_warm_peak_rss": 2.5}
    table = report["table"].splitlines()
    assert table[0] == "| | `m` |" and len(table) == 2 + len(bench.ROWS)
    assert "| parameters | 135M |" in table
    assert "| vocabulary | 49,152 |" in table
    assert "| first load: conversion | 60 s, 30 s of it reading and de-quantising the GGUF |" in table
    assert "| first load / later load | 100x |" in table


@pytest.mark.parametrize("cold, warm", [(False, False), (True, True)])
def test_model_load_report_refuses_a_cache_that_was_not_fresh(cold: bool, warm: bool) -> None:
    bench = _script("bench_model_load")
    with pytest.raises(ValueError, match="cold load must convert"):
        bench.summarise({"m": {"cold": _load("cold", cold, 61.0, 1.0), "warm": _load("warm", warm, 1.0, 1.0)}})

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


def _variant(name: str, loss: float, peak: float, above: float, seconds: float, **extra: Any) -> Dict[str, Any]:
    return {"variant": name, "first_loss": loss, "train_seconds": seconds, "peak_rss_mb": peak, "start_rss_mb": peak - above,
            "above_start_mb": above, **extra}  # fmt: skip


def test_hf_memory_report_of_a_real_model_uses_its_vocabulary_and_times_both_paths() -> None:
    bench = _script("bench_hf_memory")
    args = bench.parse_args(["--model", "gemma3-270m", "--batch", "2", "--seq", "128", "--chunk_size", "64"])
    real = {"vocab": 262144, "parameters": 268_098_176}
    report = bench.summarise(args, {"full": _variant("full", 12.5, 6000.0, 3000.0, 40.0, **real),
                                    "lean": _variant("lean", 12.5 + 1e-5, 4000.0, 1000.0, 50.0, **real)})  # fmt: skip
    assert report["setup"]["vocab"] == 262144 and report["setup"]["model"] == "gemma3-270m" and "hidden" not in report["setup"]
    assert report["setup"]["fp32_logits_mb"] == 256.0  # 2 x 128 tokens x 262,144 x 4 bytes
    assert report["ratios"] == {"peak_rss_mb_full_over_lean": 1.5, "above_start_full_over_lean": 3.0, "train_seconds_full_over_lean": 0.8}
    assert report["same_first_loss"]


def test_hf_memory_default_report_keeps_its_keys_and_flags_different_losses() -> None:
    bench = _script("bench_hf_memory")
    report = bench.summarise(bench.parse_args([]), {"full": _variant("full", 12.0, 2000.0, 1000.0, 4.0), "lean": _variant("lean", 12.1, 1000.0, 500.0, 5.0)})
    assert set(report["setup"]) == {"vocab", "hidden", "batch", "seq", "steps", "chunk_size", "fp32_logits_mb"}
    assert report["setup"]["vocab"] == 151936
    assert set(report["ratios"]) == {"peak_rss_mb_full_over_lean", "above_start_full_over_lean"}
    assert not report["same_first_loss"]

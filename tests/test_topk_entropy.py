"""Top-K entropy against the full entropy (the paper's Fig. 6): the per-token top-K mass and the
supervised rows, the correlations, and scripts/real_topk_entropy.py's report on a tiny random model
(the real measurement needs SmolLM2 and runs by hand)."""

import importlib.util
import math

import pytest
import torch

from conftest import REPO, TINY_LLAMA
from eaft_pl.analysis.statistics import average_ranks, pearson, spearman, topk_agreement
from eaft_pl.data.chat import Conversation, encode_conversation
from eaft_pl.loss.stats import IGNORE_INDEX, full_entropy, supervised_index, token_statistics, topk_entropy, topk_mass

spec = importlib.util.spec_from_file_location("real_topk_entropy", REPO / "scripts" / "real_topk_entropy.py")
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)


# ---- the per-token statistics --------------------------------------------------------------------


def test_a_row_whose_mass_is_in_its_top_k_has_equal_top_k_and_full_entropy():
    torch.manual_seed(0)
    k, vocab = 5, 300
    logits = torch.full((64, vocab), -1e4)
    logits[:, :k] = torch.randn(64, k) * 3  # every row's mass in its first K tokens, in any shape
    mass = topk_mass(logits, k)
    assert torch.allclose(mass, torch.ones(64))
    assert torch.allclose(topk_entropy(logits, k), full_entropy(logits), atol=1e-5)
    summary = topk_agreement(full_entropy(logits), topk_entropy(logits, k), mass, k)
    assert summary["pearson"] == pytest.approx(1.0, abs=1e-6) and summary["spearman"] == pytest.approx(1.0, abs=1e-6)
    assert summary["mean_abs_diff"] == pytest.approx(0.0, abs=1e-5)
    assert summary["mass_above_0.9"] == summary["mass_above_0.99"] == 1.0
    assert summary["mean_topk_norm"] == pytest.approx(summary["mean_topk"] / math.log(k))


def test_top_k_mass_is_the_share_of_probability_in_the_k_largest_logits():
    logits = torch.log(torch.tensor([[0.5, 0.1, 0.3, 0.05, 0.05], [0.2, 0.2, 0.2, 0.2, 0.2]]))
    assert torch.allclose(topk_mass(logits, 2), torch.tensor([0.8, 0.4]))
    assert torch.allclose(topk_mass(logits, 99), torch.ones(2))  # K is clamped to the vocabulary


def test_supervised_index_selects_the_rows_token_statistics_uses():
    torch.manual_seed(1)
    logits = torch.randn(2, 6, 11)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5, IGNORE_INDEX], [IGNORE_INDEX, 7, 8, IGNORE_INDEX, 9, 1]])
    index, y = supervised_index(labels)
    # Row t predicts labels[t + 1]; a row's last position predicts nothing.
    assert index.tolist() == [1, 2, 3, 6, 7, 9, 10] and y.tolist() == [3, 4, 5, 7, 8, 9, 1]
    stats = token_statistics(logits, labels, top_k=4, compute_full_entropy=True)
    rows = logits.reshape(-1, 11)[index]
    assert torch.allclose(stats.full_entropy, full_entropy(rows)) and torch.allclose(stats.topk_entropy, topk_entropy(rows, 4))


# ---- the correlations ----------------------------------------------------------------------------


def test_pearson_matches_the_value_worked_by_hand():
    # x = 1, 2, 3 and y = 1, 2, 4: cov sum 3, |dx| sqrt 2, |dy| sqrt(42) / 3, so r = 9 / sqrt 84.
    assert pearson(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 4.0])) == pytest.approx(9 / math.sqrt(84))
    assert pearson(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])) == pytest.approx(-1.0)


def test_spearman_of_a_strictly_increasing_map_is_one_where_pearson_is_not():
    torch.manual_seed(2)
    x = torch.randn(500)
    y = torch.exp(3 * x) + 1.0
    assert spearman(x, y) == pytest.approx(1.0)
    assert pearson(x, y) < 0.9
    assert spearman(x, -y) == pytest.approx(-1.0)


def test_tied_values_share_their_mean_rank():
    assert average_ranks(torch.tensor([3.0, 1.0, 1.0, 2.0, 3.0, 3.0])).tolist() == [5.0, 1.5, 1.5, 3.0, 5.0, 5.0]


def test_correlations_refuse_mismatched_or_single_values_and_are_nan_when_constant():
    with pytest.raises(ValueError, match="x has 3 values but y has 2"):
        pearson(torch.ones(3), torch.ones(2))
    with pytest.raises(ValueError, match="at least 2 values"):
        spearman(torch.ones(1), torch.ones(1))
    assert math.isnan(pearson(torch.ones(4), torch.arange(4.0)))
    with pytest.raises(ValueError, match="k must be >= 2"):
        topk_agreement(torch.rand(4), torch.rand(4), torch.rand(4), 1)


# ---- the script's report, on a tiny random model -------------------------------------------------


@pytest.fixture(scope="module")
def tiny(char_tokenizer):
    from eaft_pl.models.loading import build_causal_lm

    torch.manual_seed(0)
    return build_causal_lm(TINY_LLAMA, char_tokenizer).eval()


def conversations(n):
    return [Conversation([{"role": "user", "content": f"What is {i} + {i}?"}, {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}], f"c{i}") for i in range(n)]


def test_the_report_has_every_figure_per_set_and_k(tiny, char_tokenizer):
    examples = [encode_conversation(char_tokenizer, c, 256) for c in conversations(5)]
    out = script.report(tiny, char_tokenizer, {"teacher": examples}, [10, 2, 5], batch_size=2)
    assert out["ks"] == [2, 5, 10]
    teacher = out["sets"]["teacher"]
    assert teacher["examples"] == 5 and teacher["tokens"] == sum(e.num_supervised for e in examples)
    assert set(teacher["per_k"]) == {"2", "5", "10"}
    keys = {"pearson", "spearman", "mean_full", "mean_topk", "mean_topk_norm", "mean_abs_diff", "mean_mass", "mass_above_0.9", "mass_above_0.99", "tokens"}
    for k in ("2", "5", "10"):
        s = teacher["per_k"][k]
        assert set(s) == keys and -1.0 <= s["pearson"] <= 1.0 and -1.0 <= s["spearman"] <= 1.0
        assert s["mass_above_0.9"] >= s["mass_above_0.99"] and s["mean_full"] == pytest.approx(teacher["mean_full"])
    masses = [teacher["per_k"][k]["mean_mass"] for k in ("2", "5", "10")]
    assert masses == sorted(masses)  # more tokens kept, more mass
    lines = out["table"].splitlines()
    assert len(lines) == 2 + 3 and lines[2].startswith(f"| teacher ({teacher['tokens']} tokens) | 2 |")
    named = script.report(tiny, char_tokenizer, {"base_greedy": examples[:2]}, [2], batch_size=2)["table"]
    assert named.splitlines()[2].startswith("| base greedy (")  # the key's underscore reads as a space
    assert out["_tokens"]["teacher"]["full"].shape == (teacher["tokens"],)
    with pytest.raises(ValueError, match="--ks must hold integers >= 2"):
        script.report(tiny, char_tokenizer, {"teacher": examples}, [1, 5], batch_size=2)
    with pytest.raises(ValueError, match="hold a space"):
        script.report(tiny, char_tokenizer, {"base greedy": examples}, [2], batch_size=2)


def test_greedy_examples_supervise_exactly_the_generated_tokens(tiny, char_tokenizer):
    from eaft_pl.evaluation.tasks import chat_prompt_ids

    prompts = ["What is 1 + 1?", "Name a colour."]
    examples = script.greedy_examples(tiny, char_tokenizer, prompts, max_new_tokens=4, batch_size=2)
    for prompt, example in zip(prompts, examples):
        n = len(chat_prompt_ids(char_tokenizer, prompt))
        assert example.labels[:n] == [IGNORE_INDEX] * n
        assert example.labels[n:] == example.input_ids[n:] and 1 <= len(example.labels) - n <= 4
        assert example.num_supervised == len(example.labels) - n


def test_the_figure_is_drawn_and_has_one_panel_per_entry(tiny, char_tokenizer, tmp_path):
    examples = [encode_conversation(char_tokenizer, c, 256) for c in conversations(3)]
    out = script.report(tiny, char_tokenizer, {"teacher": examples}, [2, 5, 10], batch_size=3)
    path = script.figure(out["_tokens"]["teacher"], out["sets"]["teacher"], out["ks"], tmp_path / "fig.png", "tiny")
    assert path.is_file() and path.stat().st_size > 0
    from eaft_pl.analysis.plots import hexbin_figure

    fig = hexbin_figure([("a", [0.0, 1.0], [0.0, 0.5]), ("b", [0.0, 2.0], [0.1, 1.0])], x_label="x", y_label="y", ceilings=[0.5, None])
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["a", "b"]
    with pytest.raises(ValueError, match="1 ceilings for 2 panels"):
        hexbin_figure([("a", [0.0], [0.0]), ("b", [0.0], [0.0])], x_label="x", y_label="y", ceilings=[1.0])

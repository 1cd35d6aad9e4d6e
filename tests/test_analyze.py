"""eaft-pl analyze: the summary against statistics computed directly from the model it analysed, the
on-policy answers against greedy decoding, the MLflow run it writes, and its errors."""

import copy
import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mlflow import MlflowClient

from conftest import REPO
from eaft_pl.analysis.analyze import on_policy_examples, score_examples, stop_token_ids
from eaft_pl.cli import cli_main
from eaft_pl.data.chat import DataError, EncodedExample, collate
from eaft_pl.loss.stats import token_statistics
from test_cli import quick_args, runs

N_EXAMPLES = 12


@pytest.fixture
def small_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = (REPO / "data" / "quickstart" / "train.jsonl").read_text().splitlines()[:N_EXAMPLES]
    path = tmp_path / "small.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def analyze_args(tmp_path, data, *extra):
    return [
        "analyze", *quick_args(tmp_path),
        f"--data.init_args.train_file={data}", f"--data.init_args.val_file={data}",
        "--trainer.logger.init_args.run_name=analyze-test",
        "--max_new_tokens=6", "--progress_bar=false", "--bins=5", *extra,
    ]  # fmt: skip


def test_analyze_reports_what_a_direct_pass_computes_and_logs_an_mlflow_run(small_data, tmp_path, capsys):
    out_dir = tmp_path / "analysis"
    # Thresholds loose enough that the random model's tokens are flagged, so the table checks below
    # check something.
    cli = cli_main(analyze_args(
        tmp_path, small_data, f"--output_dir={out_dir}", "--quantile=0.2", "--full_entropy=true",
        "--model.init_args.conflict_max_norm_entropy=1.0", "--model.init_args.conflict_max_label_prob=0.5",
    ))  # fmt: skip
    printed = capsys.readouterr().out
    assert "| sft_data |" in printed and "| on_policy |" in printed
    summary = json.loads((out_dir / "summary.json").read_text())
    module, data = cli.model, cli.datamodule
    examples = data.datasets["train"]
    assert summary["examples_analysed"] == N_EXAMPLES  # max_examples (1000) exceeds the data: all of it

    # The same statistics, computed directly from the analysed model over all examples at once.
    with torch.no_grad():
        batch = collate(examples, data.pad_token_id)
        stats = token_statistics(module(batch["input_ids"], batch["attention_mask"]), batch["labels"], compute_full_entropy=True)
    p, hn = stats.label_prob.double(), stats.norm_entropy.double()
    s = summary["sft_data"]
    assert s["tokens"] == stats.num_tokens == sum(e.num_supervised for e in examples)
    assert s["label_prob"] == pytest.approx(p.mean().item(), rel=1e-4)
    assert s["weights"]["eaft"]["mean"] == pytest.approx(hn.mean().item(), rel=1e-4)
    h_full = stats.full_entropy.double()
    assert s["full_entropy"]["mean"] == pytest.approx(h_full.mean().item(), rel=1e-4)
    r = torch.corrcoef(torch.stack([h_full, stats.topk_entropy.double()]))[0, 1].item()
    assert s["full_entropy"]["pearson_with_topk"] == pytest.approx(r, abs=1e-4)
    hp = module.hparams
    flags = (hn <= hp.conflict_max_norm_entropy) & (p <= hp.conflict_max_label_prob)
    assert flags.any()
    assert s["conflicts"]["absolute_share"] == pytest.approx(flags.double().mean().item())
    k = -(-2 * stats.num_tokens // 10)  # ceil(0.2 n)
    h_t, p_t = sorted(hn.tolist())[k - 1], sorted(p.tolist())[k - 1]
    both = ((hn <= h_t + 1e-6) & (p <= p_t)).double().mean().item()  # no tie tolerance on p
    assert s["conflicts"]["quantile_share"] == pytest.approx(both, abs=1e-9)
    assert sum(map(sum, s["plane"]["counts"])) == stats.num_tokens
    # Conflict tokens: counted per token id, as a Counter over the flagged labels does.
    labels = batch["labels"][:, 1:]
    targets = labels[labels != -100]
    counter = Counter(targets[flags].tolist())
    assert summary["top_conflict_tokens"]
    for row in summary["top_conflict_tokens"]:
        assert row["conflicts"] == counter[row["token_id"]]
        assert row["occurrences"] == int((targets == row["token_id"]).sum())
    assert sum(r["conflicts"] for r in summary["top_conflict_tokens"]) == sum(sorted(counter.values(), reverse=True)[:20])

    # The MLflow run: tags, config, metrics and the artifacts (figures, summary, report).
    client, (run,) = runs(tmp_path)
    assert run.info.run_name == "analyze-test" and run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "analyze" and run.data.tags["method"] == "eaft"
    assert run.data.metrics["analyze/sft_data/conflict_share_absolute"] == pytest.approx(s["conflicts"]["absolute_share"])
    assert run.data.metrics["analyze/on_policy/tokens"] == summary["on_policy"]["tokens"]
    # The EAFT-weighted gradient, named apart from the training callback's active-gate metric.
    assert run.data.metrics["analyze/sft_data/grad_norm_eaft_all"] == pytest.approx(s["regions"]["grad_norm_eaft_all"])
    assert not any("grad_norm_weighted" in k for k in run.data.metrics)
    files = {a.path for a in client.list_artifacts(run.info.run_id, "analyze")}
    assert files == {f"analyze/{n}" for n in ("summary.json", "report.md", "plane.png", "gradient.png", "weights.png")}
    assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert (out_dir / "plane.png").read_bytes()[:4] == b"\x89PNG"


def test_greedy_answers_are_the_models_argmax_continuations(small_data, tmp_path):
    args = [*quick_args(tmp_path), f"--data.init_args.train_file={small_data}", f"--data.init_args.val_file={small_data}"]
    cli = cli_main(args, run=False)  # the model and data of the config, nothing run
    module, data = cli.model, cli.datamodule
    data.setup("fit")
    module.configure_model()
    module.eval()
    examples = data.datasets["train"][:4]
    answers = on_policy_examples(
        module, examples, mode="greedy", max_new_tokens=5, temperature=1.0, batch_size=2, device=torch.device("cpu")
    )
    assert len(answers) == 4
    for ex, ans in zip(examples, answers):
        first = next(i for i, y in enumerate(ex.labels) if y != -100)
        assert ans.input_ids[:first] == ex.input_ids[:first]  # the same prompt
        assert all(y == -100 for y in ans.labels[:first]) and ans.labels[first:] == ans.input_ids[first:]
        # Each answer token is the argmax of the model given the prompt and the answer so far.
        with torch.no_grad():
            logits = module(torch.tensor([ans.input_ids]))[0]
        assert ans.input_ids[first:] == logits[first - 1 : len(ans.input_ids) - 1].argmax(-1).tolist()
    table = score_examples(module, answers, batch_size=3, device=torch.device("cpu"))
    # Greedy tokens have the largest probability at their position: at least 1/V.
    assert table.label_prob.min() >= 1 / len(module.tokenizer) - 1e-6
    assert table.example.tolist() == sorted(table.example.tolist())


def test_generation_stops_at_the_end_of_turn_token_when_eos_differs(char_tokenizer):
    tok = copy.deepcopy(char_tokenizer)
    tok.eos_token, tok.pad_token = "<|endoftext|>", "<unk>"  # eos is not the token that ends a turn
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id != end_of_turn
    prompt = tok.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    reply = tok.encode("ok", add_special_tokens=False) + [end_of_turn]
    example = EncodedExample(prompt + reply, [-100] * len(prompt) + reply)
    assert stop_token_ids(tok, [example]) == sorted({tok.eos_token_id, end_of_turn})
    after = tok.encode("\n<|im_start|>user", add_special_tokens=False)
    calls = []

    class Model:
        def generate(self, input_ids, **kwargs):
            calls.append(kwargs)
            return torch.cat([input_ids, torch.tensor([reply + after])], dim=1)  # runs on past the turn

    module = SimpleNamespace(tokenizer=tok, model=Model())
    (answer,) = on_policy_examples(
        module, [example], mode="greedy", max_new_tokens=20, temperature=1.0, batch_size=1, device=torch.device("cpu")
    )
    assert set(calls[0]["eos_token_id"]) == {tok.eos_token_id, end_of_turn}
    assert answer.input_ids == prompt + reply  # cut after <|im_end|>, which is kept


def test_a_missing_split_is_named(small_data, tmp_path):
    with pytest.raises(DataError, match="no 'test' split"):
        cli_main(analyze_args(tmp_path, small_data, "--split=test", "--on_policy=none"))
    _, (run,) = runs(tmp_path)
    assert run.info.status == "FAILED"  # the run the analysis opened is not left RUNNING
    with pytest.raises(ValueError, match="quantile must lie in"):
        cli_main(analyze_args(tmp_path, small_data, "--quantile=0", "--on_policy=none"))


def test_help_lists_analyze_and_documents_its_options(capsys):
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    assert "analyze" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main(["analyze", "--help"])
    out = capsys.readouterr().out
    assert "--max_examples" in out and "random sample" in out and "--on_policy" in out
    assert Path(REPO / "configs" / "setup" / "quickstart.yaml").is_file()

"""eaft_pl.integrations.transformers: EAFT in transformers.Trainer and TRL's SFTTrainer.

Every model is a tiny Llama with random weights built here (no hub). Losses are checked against an
independent computation (torch's cross-entropy and top-k), not against the package's own code.
"""

from __future__ import annotations

import copy
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from eaft_pl.integrations.transformers import (  # noqa: E402
    EAFTLoss,
    EAFTTrainer,
    ForgettingCallback,
    add_lean_forward,
    forgetting_metrics,
)
from eaft_pl.loss import DFTGate, EntropyMaskGate, FLOWGate, SFTGate, StaticEAFTGate  # noqa: E402

VOCAB = 64
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def tiny_llama(vocab: int = VOCAB, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def examples(supervised=(1, 9, 2, 14), length: int = 16, seed: int = 1):
    """Sequences of one length whose last ``n`` labels are supervised: very unequal token counts, the
    case a mean over micro-batches weighs wrongly."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in supervised:
        ids = torch.randint(1, VOCAB, (length,), generator=g)
        labels = torch.full((length,), -100)
        labels[length - n - 1 :] = ids[length - n - 1 :]  # n + 1 labels: the first is never a target
        out.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long), "labels": labels})
    return out


def collate(rows):
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def independent_loss(logits, labels, gate: str, top_k: int = 20):
    """sum(w * CE) / N from F.cross_entropy and torch.topk: EAFT's w = H_topK / ln K, SFT's w = 1."""
    z = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    y = labels[:, 1:].reshape(-1)
    keep = y != -100
    z, y = z[keep], y[keep]
    ce = F.cross_entropy(z, y, reduction="none")
    if gate == "sft":
        w = torch.ones_like(ce)
    else:
        logp = torch.log_softmax(torch.topk(z, top_k, dim=-1).values, dim=-1)
        w = (-(logp.exp() * logp).sum(-1) / math.log(top_k)).detach()
    return (w * ce).sum() / keep.sum()


def args(tmp_path, **overrides) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        optim="sgd",
        max_grad_norm=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
        seed=0,
    )
    return TrainingArguments(**{**base, **overrides})


class Snapshots(TrainerCallback):
    """The model's weights at the start of every optimizer step."""

    def __init__(self):
        self.states = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.states.append(copy.deepcopy(model.state_dict()))


def test_import_loads_no_lightning_or_mlflow():
    code = (
        "import sys, eaft_pl.integrations.transformers as m; m.EAFTSFTTrainer; "
        "bad = [n for n in ('lightning', 'pytorch_lightning', 'mlflow') if n in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=ENV, cwd=REPO)


@pytest.mark.parametrize("gate", ["eaft", "sft"])
def test_trainer_loss_is_the_independent_loss_at_every_step(tmp_path, gate):
    """Trainer(compute_loss_func=EAFTLoss) logs, at each step, the EAFT / SFT loss of the batch at the
    weights of that step, and the weights move."""
    data = examples()
    snapshots = Snapshots()
    loss = EAFTLoss(SFTGate() if gate == "sft" else None)
    trainer = Trainer(model=tiny_llama(), args=args(tmp_path), train_dataset=data, data_collator=collate, compute_loss_func=loss, callbacks=[snapshots])
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3 == len(snapshots.states)
    batch = collate(data)  # one batch is the whole data set: every step sees the same tokens
    model = tiny_llama()
    expected = []
    for state in snapshots.states:
        model.load_state_dict(state)
        with torch.no_grad():
            expected.append(independent_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"], gate).item())
    assert logged == pytest.approx(expected, rel=1e-5)
    assert expected[-1] < expected[0]  # the updates were applied


def _one_step_weights(tmp_path, loss, batch_size, accumulation, lean):
    model = tiny_llama()
    kwargs = dict(model=model, args=args(tmp_path, max_steps=1, per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation),
                  train_dataset=examples(), data_collator=collate)  # fmt: skip
    trainer = EAFTTrainer(**kwargs, eaft_loss=loss) if lean else Trainer(**kwargs, compute_loss_func=loss)
    trainer.train()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("lean", [False, True], ids=["compute_loss_func", "lean"])
def test_accumulated_update_equals_one_batch_update(tmp_path, lean):
    """4 micro-batches of 1 sequence (1, 9, 2 and 14 targets) with accumulation give the SGD update of
    one batch of 4; the mean of the micro-batch means, the accumulation bug, gives another."""
    loss = EAFTLoss(chunk_size=8 if lean else None)
    one = _one_step_weights(tmp_path, loss, batch_size=4, accumulation=1, lean=lean)
    accumulated = _one_step_weights(tmp_path, loss, batch_size=1, accumulation=4, lean=lean)
    start = dict(tiny_llama().named_parameters())
    for name in one:
        torch.testing.assert_close(accumulated[name], one[name], rtol=1e-5, atol=1e-6)
    # The bug, computed directly: the per-micro-batch mean, averaged over the 4 micro-batches.
    model = tiny_llama()
    for row in examples():
        batch = collate([row])
        (independent_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"], "eaft") / 4).backward()
    naive = {name: p.detach() - 1e-2 * p.grad for name, p in model.named_parameters()}
    step = lambda w: torch.cat([(w[n] - start[n].detach()).flatten() for n in one])  # noqa: E731
    assert (step(naive) - step(one)).norm() > 0.2 * step(one).norm()


def _batch():
    rows = examples(supervised=(3, 11), length=14)
    batch = collate(rows)
    batch["attention_mask"][1, 12:] = 0  # a padded tail
    batch["labels"][1, 12:] = -100
    return batch


@pytest.mark.parametrize(
    "gate", [None, SFTGate(), DFTGate(), EntropyMaskGate(0.3), StaticEAFTGate(), FLOWGate(tau=2.0)], ids=lambda g: type(g).__name__
)
def test_lean_loss_and_gradients_equal_the_full_logits_ones(gate):
    """The patched forward's chunked loss (chunks smaller than the batch) equals the full-logits loss of
    the same EAFTLoss, in value and in every parameter's gradient, for token-local, batch-level and
    reference gates."""
    batch = _batch()
    reference = tiny_llama(seed=5) if gate is not None and gate.needs_reference else None
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    count = torch.tensor(25)  # as if the step held more tokens than this micro-batch
    model = tiny_llama()
    lean = EAFTLoss(gate, chunk_size=5, reference_model=reference)
    full = EAFTLoss(gate, reference_model=reference)
    add_lean_forward(model)

    reference_stats, _ = lean.reference_statistics(inputs, labels)
    lean_value = model(**inputs, labels=labels, num_items_in_batch=count, eaft_loss=lean, eaft_reference=reference_stats).loss
    lean_value.backward()
    lean_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    full_value = full.full_loss(model(**inputs).logits, labels, count, inputs=inputs)
    full_value.backward()
    assert lean_value.item() == pytest.approx(full_value.item(), rel=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(lean_grads[name], p.grad, rtol=1e-5, atol=1e-7)
    if gate is None:  # and both are the independent EAFT loss
        with torch.no_grad():
            expected = independent_loss(model(**inputs).logits, labels, "eaft") * (labels[:, 1:] != -100).sum() / 25
        assert full_value.item() == pytest.approx(expected.item(), rel=1e-5)


def test_refusals_name_the_option():
    with pytest.raises(ValueError, match=r"reference_model=\.\.\.\).*StaticEAFTGate"):
        EAFTLoss(StaticEAFTGate())
    with pytest.raises(ValueError, match=r"kl_coef=.*chunk_size=None"):
        EAFTLoss(SFTGate(), kl_coef=0.5, chunk_size=64, reference_model=tiny_llama())
    with pytest.raises(ValueError, match=r"FLOWGate\(tau=\.\.\.\)"):
        EAFTLoss(FLOWGate(), reference_model=tiny_llama())
    with pytest.raises(ValueError, match="top_k"):
        EAFTLoss(top_k=1)
    batch = _batch()
    logits = tiny_llama()(input_ids=batch["input_ids"]).logits
    with pytest.raises(ValueError, match="compute_loss_func does not receive"):
        EAFTLoss(StaticEAFTGate(), reference_model=tiny_llama())({"logits": logits}, batch["labels"])
    with pytest.raises(ValueError, match="EAFTTrainer"):
        EAFTLoss(chunk_size=8)({"logits": logits}, batch["labels"])


def test_sft_kl_adds_the_exact_kl_to_the_loss():
    """SFT-KL through the reference model: the loss is mean CE + beta * mean KL(p || p_ref)."""
    batch = _batch()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model, reference = tiny_llama(), tiny_llama(seed=5)
    logits = model(**inputs).logits
    value = EAFTLoss(SFTGate(), reference_model=reference, kl_coef=0.5).full_loss(logits, batch["labels"], inputs=inputs)
    with torch.no_grad():
        ref_logits = reference(**inputs).logits
    keep = batch["labels"][:, 1:] != -100
    logp, logq = (torch.log_softmax(x[:, :-1][keep].float(), -1) for x in (logits, ref_logits))
    kl = (logp.exp() * (logp - logq)).sum(-1)
    expected = independent_loss(logits, batch["labels"], "sft") + 0.5 * kl.mean()
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)


def conversations(n: int = 8):
    return [
        {
            "prompt": [{"role": "user", "content": f"Say {i} {'x' * i}"}],
            "completion": [{"role": "assistant", "content": f"{i} " * (1 + i % 4)}],  # unequal lengths
        }
        for i in range(n)
    ]


def test_sft_trainer_lean_path_trains_without_the_lm_head_and_logs_the_eaft_loss(tmp_path, char_tokenizer):
    """TRL's SFTTrainer with the mixin and chunk_size: the LM head module never runs in training (no full
    logits), and the first logged loss is the independent EAFT loss of the collated data set."""
    from datasets import Dataset
    from trl import SFTConfig

    from eaft_pl.integrations.transformers import EAFTSFTTrainer

    model = tiny_llama(vocab=len(char_tokenizer))
    config = SFTConfig(
        str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=8, learning_rate=1e-2, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, bf16=False, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = EAFTSFTTrainer(
        model=model, args=config, train_dataset=Dataset.from_list(conversations()), processing_class=char_tokenizer, eaft_loss=EAFTLoss(chunk_size=16)
    )
    snapshots = Snapshots()
    trainer.add_callback(snapshots)
    head_calls = []
    model.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
    trainer.train()
    assert head_calls == []
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    assert (batch["labels"] != -100).sum(1).unique().numel() > 1  # unequal supervised tokens per row
    check = tiny_llama(vocab=len(char_tokenizer))
    check.load_state_dict(snapshots.states[0])
    with torch.no_grad():
        logits = check(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = independent_loss(logits, batch["labels"], "eaft").item()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged[0] == pytest.approx(expected, rel=1e-5)


class Recorder(TrainerCallback):
    """What the report_to loggers receive: every on_log payload."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs)))


def test_forgetting_callback_logs_base_and_every_evaluation(tmp_path, char_tokenizer):
    from eaft_pl.data.chat import Conversation
    from eaft_pl.evaluation.forgetting import forgetting, suite_averages
    from eaft_pl.evaluation.tasks import MultipleChoiceTask, PerplexityTask

    chats = [Conversation([{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"ok {i}"}]) for i in range(3)]
    items = [{"prompt": f"pick {i}", "choices": ["a", "bb", "c"], "label": i % 3} for i in range(3)]
    suites = {"general": [PerplexityTask("chat", chats), MultipleChoiceTask("mc", items)], "domain": [PerplexityTask("dom", chats[:1])]}
    model = tiny_llama(vocab=len(char_tokenizer))
    recorder = Recorder()
    trainer = Trainer(
        model=model, args=args(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=1), train_dataset=examples(),
        eval_dataset=examples()[:2], data_collator=collate, processing_class=char_tokenizer, callbacks=[recorder],
        compute_loss_func=EAFTLoss(),
    )  # fmt: skip
    callback = ForgettingCallback(suites).attach(trainer)
    trainer.train()

    assert [record["step"] for record in callback.history] == [0, 1, 2]
    logged = {step: logs for step, logs in recorder.logs if "val/general/chat/ce" in logs}
    assert sorted(logged) == [0, 1, 2]
    assert logged[0]["forgetting/general/ce"] == 0.0 and logged[0]["gain/domain/ppl"] == 0.0
    # The final scores are those of the trained model, scored again here.
    final = {task.name: task.evaluate(model.eval(), char_tokenizer) for task in suites["general"]}
    assert logged[2]["val/general/chat/ce"] == pytest.approx(final["chat"]["ce"], rel=1e-5)
    assert logged[2]["val/general/mc/acc"] == final["mc"]["acc"]
    # Forgetting and gain as the Lightning callback defines them (eaft_pl.evaluation.forgetting).
    base, last = (suite_averages(callback.history[i]["scores"]) for i in (0, -1))
    assert logged[2]["forgetting/general/ce"] == pytest.approx(forgetting(base["general"]["ce"], last["general"]["ce"], "ce"))
    assert logged[2]["forgetting/general/acc"] == pytest.approx(forgetting(base["general"]["acc"], last["general"]["acc"], "acc"))
    assert logged[2]["gain/domain/ppl"] == pytest.approx(-forgetting(base["domain"]["ppl"], last["domain"]["ppl"], "ppl"))
    assert logged[2]["forgetting/general/ce"] != 0.0  # training moved the scores
    assert trainer.evaluate()["val/general/chat/ce"] == pytest.approx(logged[2]["val/general/chat/ce"])


def test_forgetting_metrics_signs():
    base = {"general": {"a": {"acc": 0.5, "ce": 2.0}, "b": {"acc": 0.7}}, "domain": {"d": {"acc": 0.1}}}
    now = {"general": {"a": {"acc": 0.3, "ce": 2.5}, "b": {"acc": 0.5}}, "domain": {"d": {"acc": 0.4}}}
    out = forgetting_metrics(base, now, lower_is_better={"ce"})
    assert out["forgetting/general/acc"] == pytest.approx(0.2)  # accuracy fell: forgot 0.2
    assert out["forgetting/general/ce"] == pytest.approx(0.5)  # CE rose: forgot 0.5
    assert out["gain/domain/acc"] == pytest.approx(0.3)
    assert out["val/general/avg/acc"] == pytest.approx(0.4)


def test_forgetting_callback_needs_attach(tmp_path, char_tokenizer):
    trainer = Trainer(model=tiny_llama(), args=args(tmp_path, max_steps=1), train_dataset=examples(), data_collator=collate,
                      processing_class=char_tokenizer, callbacks=[ForgettingCallback({"general": []})])  # fmt: skip
    with pytest.raises(ValueError, match=r"attach\(trainer\)"):
        trainer.train()


def _python_blocks(markdown: str):
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_docs_example_runs_as_written(tmp_path, char_tokenizer):
    """docs/huggingface.md's first example, run unchanged in a fresh process, offline, with its model id
    resolved from a local Hugging Face cache that holds a tiny Llama under that id."""
    code = _python_blocks((REPO / "docs" / "huggingface.md").read_text())[0]
    assert len([line for line in code.splitlines() if line.strip()]) <= 15
    model_id = re.search(r'model_id = "([^"]+)"', code).group(1)
    snapshot = tmp_path / "hub" / f"models--{model_id.replace('/', '--')}" / "snapshots" / ("0" * 40)
    tiny_llama(vocab=len(char_tokenizer)).save_pretrained(snapshot)
    char_tokenizer.save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    script = tmp_path / "example.py"
    script.write_text(code + "\nassert trainer.state.global_step > 0\n")
    env = {**ENV, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "home"), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_docs_quote_the_committed_benchmark():
    """docs/huggingface.md shows both ratios of docs/results/bench_hf_memory.json as rendered blocks
    (scripts/render_results.py --check, run by CI, keeps the rendered values equal to the file's),
    and the benchmark compared equal losses."""
    import json

    results = json.loads((REPO / "docs" / "results" / "bench_hf_memory.json").read_text())
    page = (REPO / "docs" / "huggingface.md").read_text()
    assert results["same_first_loss"]
    for name, ratio in results["ratios"].items():
        assert f"**<!-- results:bench_hf_memory ratios/{name} -->{ratio}<!-- /results --> times**" in page
    assert "<!-- results:bench_hf_memory stamp -->" in page

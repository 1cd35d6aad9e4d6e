"""Step-level token normalisation across ranks: 2 CPU processes (DDP) with very different token counts
give the gradients of one process holding the whole batch."""

import json

import lightning.pytorch as pl
import pytest
import torch

from conftest import TINY_LLAMA
from test_module import InOrderData, first_step_grads
from eaft_pl import EAFTModule
from eaft_pl.losses import EAFTGate

# Supervised tokens per example: 3, 4, 32 and 62 (answer + end-of-turn + newline). Every way of
# splitting them 2 + 2 over two ranks is unbalanced (7/94, 35/66, 65/36), so per-rank means differ
# from the global mean whichever split the distributed sampler picks.
RECORDS = [
    {"prompt": "a", "response": "1"},
    {"prompt": "b", "response": "22"},
    {"prompt": "c", "response": "x" * 30},
    {"prompt": "d", "response": "y" * 60},
]


class SaveGrads(EAFTModule):
    """Writes the gradients the optimizer sees (after rescaling) to ``grads_path`` on rank 0."""

    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        if self.trainer.is_global_zero:
            torch.save({n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None}, self.grads_path)


@pytest.mark.slow
@pytest.mark.parametrize(
    "normalization, micro_batch, accumulate, chunk_size",
    [("step", 2, 1, None), ("step", 1, 2, None), ("step", 2, 1, 5), ("micro_batch", 2, 1, None)],
)
def test_two_ranks_equal_one_process(tmp_path, tokenizer_dir, normalization, micro_batch, accumulate, chunk_size):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    # The reference: one process, one batch of the four examples.
    single = first_step_grads(str(train), tokenizer_dir, micro_batch=4, accumulate=1)

    pl.seed_everything(0)
    module = SaveGrads(
        model_config=TINY_LLAMA,
        tokenizer_name_or_path=str(tokenizer_dir),
        gate=EAFTGate(),
        loss_normalization=normalization,
        chunk_size=chunk_size,
    )
    module.grads_path = str(tmp_path / "grads.pt")  # an instance attribute travels to the spawned ranks
    data = InOrderData(train_file=str(train), tokenizer_name_or_path=str(tokenizer_dir), batch_size=micro_batch)
    trainer = pl.Trainer(
        max_steps=1,
        accumulate_grad_batches=accumulate,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    ddp = torch.load(tmp_path / "grads.pt")
    assert ddp.keys() == single.keys()
    close = all(torch.allclose(ddp[n], single[n], rtol=1e-4, atol=1e-7) for n in single)
    # Step normalisation is exact across ranks; per-rank means over-weight the short answers.
    assert close is (normalization == "step")

"""An independent re-implementation of LLaMA-Factory's ``eaft_loss_func`` and ``dft_loss_func``
(PR #9720, ``src/llamafactory/train/trainer_utils.py``), written from a step-by-step description of what
those functions compute: fp32 logits; labels padded by one and shifted; per-token CE;
top-20 logits of the valid tokens; entropy of their softmax; divided by 3.0; to the power alpha; all
under no_grad; ``sum / num_items_in_batch`` or the mean over valid tokens. It is the yardstick the
tests hold eaft-pl's losses against, so it deliberately shares no code with them.
"""

import torch
import torch.nn.functional as F


def _per_token(logits, labels):
    logits = logits.float()
    labels = F.pad(labels, (0, 1), value=-100)
    shift_labels = labels[..., 1:].contiguous()
    vocab = logits.size(-1)
    logits = logits.view(-1, vocab)
    shift_labels = shift_labels.view(-1)
    per_token_loss = F.cross_entropy(logits, shift_labels, ignore_index=-100, reduction="none")
    valid_mask = shift_labels != -100
    return logits, per_token_loss, valid_mask


def _reduce(weighted, num_items_in_batch):
    if num_items_in_batch is not None:
        return weighted.sum() / num_items_in_batch
    return weighted.mean()


def lf_eaft_loss_func(logits, labels, num_items_in_batch=None, alpha=1.0):
    logits, per_token_loss, valid_mask = _per_token(logits, labels)
    if valid_mask.sum() == 0:
        return torch.tensor(0.0)
    valid_losses = per_token_loss[valid_mask]
    with torch.no_grad():
        z = logits[valid_mask].detach()
        topk_val = torch.topk(z, k=20, dim=-1).values
        logp = topk_val - torch.logsumexp(topk_val, dim=-1, keepdim=True)
        entropy = -(logp.exp() * logp).sum(-1)
        weight = (entropy / 3.0) ** alpha
    return _reduce(valid_losses * weight, num_items_in_batch)


def lf_dft_loss_func(logits, labels, num_items_in_batch=None):
    logits, per_token_loss, valid_mask = _per_token(logits, labels)
    if valid_mask.sum() == 0:
        return torch.tensor(0.0)
    valid_losses = per_token_loss[valid_mask]
    with torch.no_grad():
        weight = torch.exp(-valid_losses)
    return _reduce(valid_losses * weight, num_items_in_batch)

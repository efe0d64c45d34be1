"""The hierarchical recipe's loss: one task's loss on one batch (`task_loss`, what training backpropagates) and
each task's mean loss over a split (`evaluate_losses`, the val rows of losses.csv)."""

from __future__ import annotations

from typing import Any

import torch

from rsg_eval.engine import runtime
from rsg_eval.engine.runtime import Dist
from rsg_eval.models.hierarchical import HierarchicalT5
from rsg_eval.training.hmtl.dataset import collate


def task_loss(model: Any, batch: Any, ner_loss: str = "softmax") -> torch.Tensor:
    """One task's loss on one batch through the model's forward (HierarchicalT5.forward; `model` may be its DDP or
    FSDP wrapper): a mean over its examples, or its real tokens, in fp32 even under bf16 autocast."""
    return model(batch.task, input_ids=batch.input_ids, attention_mask=batch.attention_mask, target=batch.target,
                 ner_loss=ner_loss)


@torch.no_grad()
def evaluate_losses(model: HierarchicalT5, ds: Any, idx: dict[str, Any], tasks: list[str], *, batch_size: int,
                    pad_id: int, n_ner: int, device: torch.device, bf16: bool, ner_loss: str = "softmax",
                    dist: Any = None) -> dict[str, float]:
    """Mean loss per task over the whole split (batch losses weighted by batch size), in eval mode.

    dist (rsg_eval.engine.runtime.Dist): several processes split the batches round-robin and sum their totals in one
    collective, so each evaluates 1/world of the split; the batches, hence the figures, are those of one process."""
    from rsg_eval.engine.collective import all_sum_floats, shard

    d = dist or Dist()
    was = model.training
    model.eval()
    sums: list[float] = []
    names: list[str] = []
    for t in tasks:
        rows_idx = idx.get(t)
        if rows_idx is None or not len(rows_idx):
            continue
        # summed on the device, read once per task (not once per batch: each read waits for the GPU)
        total = torch.zeros((), device=device, dtype=torch.float64)
        n = 0
        for i in shard(len(rows_idx), d, batch_size):
            chunk = rows_idx[i:i + batch_size].tolist()
            batch = collate(ds[chunk], t, pad_id=pad_id, n_ner=n_ner, device=device, ner_loss=ner_loss)
            with runtime.autocast(device, bf16):
                loss = task_loss(model, batch, ner_loss)
            total += loss.to(total.dtype) * len(chunk)
            n += len(chunk)
        names.append(t)
        sums += [total.item(), float(n)]
    sums = all_sum_floats(sums, d)
    model.train(was)
    return {t: sums[2 * k] / sums[2 * k + 1] for k, t in enumerate(names)}

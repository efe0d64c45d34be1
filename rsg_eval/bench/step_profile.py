"""`rsg bench finetune --profile`: torch.profiler over a few training steps of our loop or of transformers'
Seq2SeqTrainer (the grouped one `rsg_eval.bench.hf_trainer` races), to see which ops take the time. What found the
fused-kernel gain.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from rsg_eval.bench.timing import sync
from rsg_eval.training.finetune.config import FinetuneConfig
from rsg_eval.training.finetune.data import Pair


def profile_steps(model_factory: Callable[[], tuple[torch.nn.Module, Any]], pairs: Sequence[Pair],
                  cfg: FinetuneConfig, device: torch.device, *, steps: int = 10, fused_kernels: bool = True,
                  hf: bool = False, rows: int = 12) -> dict[str, Any]:
    """torch.profiler over `steps` training steps of our loop (or of the Trainer when `hf`), after 2 untimed ones:
    the ops that take the time, by self CPU time (on a GPU also CUDA time). What found the fused-kernel gain."""
    from torch.profiler import ProfilerActivity, profile

    m, tok = model_factory()
    m.to(device).train()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    capped = FinetuneConfig(**{**cfg.to_dict(), "adam_betas": tuple(cfg.adam_betas), "max_steps": 2 + steps})
    state: dict[str, Any] = {}

    class _Prof:
        def __init__(self) -> None:
            self.p = profile(activities=acts)

        def step(self, n: int) -> None:
            if n == 2:
                self.p.__enter__()
                state["on"] = True
            if n == 2 + steps and state.get("on"):
                sync(device)
                self.p.__exit__(None, None, None)
                state["on"] = False

    prof = _Prof()
    if hf:
        from transformers import TrainerCallback

        class Cb(TrainerCallback):
            def on_step_end(self, args, st, control, **kw):  # noqa: ANN001
                prof.step(st.global_step)

        _run_hf_with_callback(m, tok, pairs, cfg, device, 2 + steps, Cb())
    else:
        from rsg_eval.training.finetune.loop import Hooks, train

        with tempfile.TemporaryDirectory(prefix="rsg-prof-") as tmp:
            train(m, tok, list(pairs), capped, evaluate=lambda _m: {"score": 0.0}, ckpt_dir=Path(tmp),
                  fingerprint={}, device=device, hooks=Hooks(on_step=lambda s, _l: prof.step(s.step)),
                  fused_kernels=fused_kernels, task="profile")
    if state.get("on"):
        prof.p.__exit__(None, None, None)
    avg = prof.p.key_averages()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, key) for e in avg) or 1
    top = sorted(avg, key=lambda e: -getattr(e, key))[:rows]
    return {"steps": steps, "total_ms_per_step": total / 1e3 / steps,
            "top": [{"op": e.key, "calls_per_step": e.count / steps, "ms_per_step": getattr(e, key) / 1e3 / steps,
                     "share": getattr(e, key) / total} for e in top]}


def _run_hf_with_callback(model: torch.nn.Module, tokenizer: Any, pairs: Sequence[Pair], cfg: FinetuneConfig,
                          device: torch.device, steps: int, callback: Any) -> None:
    """The grouped Trainer for `steps` steps with an extra callback (for profiling)."""
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from rsg_eval.engine.optim import make_optimizer, param_groups
    from rsg_eval.training.finetune.loop import lr_factor, plan_sizes

    data = [{"input_ids": list(p.src), "attention_mask": [1] * len(p.src), "labels": list(p.tgt)} for p in pairs]
    _, _, total = plan_sizes(len(pairs), cfg, 1)
    warm = cfg.warmup_steps or int(round(cfg.warmup_ratio * total))
    with tempfile.TemporaryDirectory(prefix="rsg-prof-hf-") as tmp:
        args = Seq2SeqTrainingArguments(
            output_dir=tmp, per_device_train_batch_size=cfg.batch_size, max_steps=steps, learning_rate=cfg.lr,
            max_grad_norm=cfg.max_grad_norm, group_by_length=True, save_strategy="no", eval_strategy="no",
            report_to=[], disable_tqdm=True, dataloader_num_workers=0, seed=cfg.seed, use_cpu=device.type == "cpu")
        opt = make_optimizer(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.adam_betas),
                             eps=cfg.adam_eps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warm, cfg.schedule))
        trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=data,
                                 data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
                                 processing_class=tokenizer, optimizers=(opt, sched), callbacks=[callback])
        trainer.remove_callback(PrinterCallback)
        trainer.train()

"""CPU threads for the tiny model: 1 against N, in one process, the measurement behind the commands' automatic choice
(rsg_eval.models.threads: a small model on a CPU gets the idle cores).

    rsg bench threads [--threads 2] [--rounds 3]

Two pieces of work of the offline tour, on the built-in tiny model: zero-shot scoring of the bundled sample's val
prompts of five tasks, and four training steps of a batch of 8 prompts. The thread counts take turns (1, N, N, 1, ...)
so that load from other jobs falls on both alike; each keeps its best round. Prints wall and process CPU seconds.
"""

from __future__ import annotations

import time
from typing import Any, Callable


def _work() -> dict[str, Callable[[], Any]]:
    import torch

    from rsg_eval.core.data import load_items
    from rsg_eval.core.prompts import load_template
    from rsg_eval.models.loading import load_model
    from rsg_eval.scoring import score_choices

    loaded = load_model("tiny", device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    prompts, choices = [], []
    for task in ("TERRa", "RCB", "DaNetQA", "MuSeRC", "RuCoS"):
        tpl = load_template(task)
        for it in load_items("sample", task, "val"):
            if it.labels:
                r = tpl.render(it, tokenizer=tok, max_tokens=512)
                prompts.append(r.prompt)
                choices.append(list(r.choices))

    def zeroshot() -> None:
        with torch.no_grad():
            score_choices(model, tok, prompts, choices, batch_size=16)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    enc = tok(prompts[:8], return_tensors="pt", padding=True, truncation=True, max_length=256)
    labels = tok(["да"] * 8, return_tensors="pt").input_ids

    def train_steps() -> None:
        model.train()
        for _ in range(4):
            model(**enc, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()

    return {f"zero-shot scoring, {len(prompts)} prompts": zeroshot, "4 training steps, batch 8": train_steps}


def compare(threads: int = 2, rounds: int = 3) -> list[dict[str, Any]]:
    """[{work, threads, wall_s, cpu_s}] for 1 and `threads` threads, best of `rounds` interleaved rounds."""
    import torch

    before = torch.get_num_threads()
    out = []
    try:
        for name, fn in _work().items():
            fn()  # warm-up
            best: dict[int, tuple[float, float]] = {}
            for r in range(rounds):
                for n in ((1, threads) if r % 2 == 0 else (threads, 1)):
                    torch.set_num_threads(n)
                    w, c = time.perf_counter(), time.process_time()
                    fn()
                    got = (time.perf_counter() - w, time.process_time() - c)
                    best[n] = min(best.get(n, got), got)
            out += [{"work": name, "threads": n, "wall_s": best[n][0], "cpu_s": best[n][1]} for n in (1, threads)]
    finally:
        torch.set_num_threads(before)
    return out


def lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per (work, thread count), with the ratio against 1 thread."""
    out = []
    for r in rows:
        one = next(x for x in rows if x["work"] == r["work"] and x["threads"] == 1)
        out.append(f"{r['work']}: {r['threads']} thread(s): wall {r['wall_s']:.3f} s, CPU {r['cpu_s']:.3f} s"
                   + ("" if r["threads"] == 1 else f"; 1 thread is {r['wall_s'] / one['wall_s']:.2f}x faster (wall)"))
    return out

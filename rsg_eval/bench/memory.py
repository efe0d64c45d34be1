"""`rsg bench memory`: what full fine-tuning of FRED-T5-1.7B holds per GPU, computed on the meta device.

Nothing is allocated and nothing runs on a GPU: the model is built on torch's meta device (shapes and dtypes, no
storage), so the figures are computed, not measured, and the table says so.

- weights, gradients: fp32 master weights and their gradients, 4 bytes per parameter each (the recipes train with
  fp32 weights and bf16 autocast);
- optimizer state: from the optimizer factory (rsg_eval.engine.optim.state_bytes: AdamW's two moments, 8 bytes per
  parameter; issue 20's Adafactor plugs in there);
- activations: measured on the meta device by running one forward pass of the bf16 model with a hook on autograd's
  saved tensors (exactly what a backward pass keeps), attributed to the T5 block running at the time. With
  gradient checkpointing (per block, as `--gradient-checkpointing` does) a block keeps only its input until its
  backward recomputes it, so activations = everything saved outside the blocks (embeddings, final norms, LM head
  logits and loss) + each block's inputs + the largest block's saved tensors (the one recomputed at a time);
- FSDP working set: the parameters a process gathers at once, bf16 (the MixedPrecisionPolicy): the root unit
  (embeddings, LM head, norms) plus two blocks (the one running and the one prefetched), and the same again for
  their unsharded gradients before the reduce-scatter (fp32).

Per GPU: the states divided over the processes under FSDP (on the CPU with --fsdp-cpu-offload), the activations of
the per-GPU batch, plus the working set. CUDA context, allocator fragmentation and NCCL buffers (together often
1-3 GB) are not counted: a row "fits" only with 10 % of the card to spare.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

GIB = 2**30

# (label, GPUs, GB per card, sharding, CPU offload)
SETUPS: tuple[tuple[str, int, int, str, bool], ...] = (
    ("1 x 80 GB", 1, 80, "none", False),
    ("2 x 48 GB, ddp", 2, 48, "ddp", False),
    ("2 x 24 GB, ddp", 2, 24, "ddp", False),
    ("2 x 48 GB, fsdp", 2, 48, "fsdp", False),
    ("2 x 48 GB, fsdp + offload", 2, 48, "fsdp", True),
    ("2 x 24 GB, fsdp", 2, 24, "fsdp", False),
    ("2 x 24 GB, fsdp + offload", 2, 24, "fsdp", True),
    ("4 x 24 GB, fsdp", 4, 24, "fsdp", False),
    ("4 x 24 GB, fsdp + offload", 4, 24, "fsdp", True),
)


@dataclass
class Shape:
    params: int                 # unique parameters
    root_params: int            # parameters outside the T5 blocks (FSDP's root unit)
    block_params: int           # parameters of the largest block
    outside: int                # activation bytes saved outside the blocks
    block_inputs: int           # bytes of every block's input (kept under checkpointing)
    block_peak: int             # the largest block's saved bytes (recomputed one at a time)
    all_saved: int              # every saved byte without checkpointing
    shapes: tuple[tuple[int, ...], ...] = ()   # every parameter's shape (the optimizer's state may depend on it)


@dataclass
class Row:
    setup: str
    gpus: int
    card_gb: int
    weights: float              # GiB per GPU (0 with offload: on the CPU)
    grads: float
    optimizer: float
    working: float              # FSDP's gathered parameters and gradients
    activations: float
    total: float
    cpu: float                  # GiB of host memory per process for the offloaded states
    fits: bool


def fred_config(**over: Any) -> Any:
    from transformers import T5Config

    from rsg_eval.bench.finetune import FRED_1_7B

    return T5Config(**{**FRED_1_7B, **over})


def measure(config: Any, batch: int, src_len: int, tgt_len: int) -> Shape:
    """Parameter counts and saved activation bytes of one training forward, on the meta device (bf16 model)."""
    import torch

    from rsg_eval.models.untied import build_t5

    with torch.device("meta"):
        model = build_t5(config).to(torch.bfloat16)  # FRED's separate head under transformers 4 and 5
    model.train()
    params = sum(p.numel() for p in model.parameters())
    blocks = [m for m in model.modules() if type(m).__name__ == "T5Block"]
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    root = sum(p.numel() for p in model.parameters() if id(p) not in in_blocks)
    biggest = max(sum(p.numel() for p in b.parameters()) for b in blocks)

    current: list[int] = []            # index of the block running, innermost last
    per_block = [0] * len(blocks)
    inputs = [0] * len(blocks)
    outside = 0

    def pack(t: Any) -> Any:
        nonlocal outside
        n = t.numel() * t.element_size()
        if current:
            per_block[current[-1]] += n
        else:
            outside += n
        return t

    hooks = []
    for i, b in enumerate(blocks):
        def pre(mod: Any, args: Any, kwargs: Any, i: int = i) -> None:
            current.append(i)
            hs = args[0] if args else kwargs.get("hidden_states")
            inputs[i] += hs.numel() * hs.element_size()     # (B, T, d): what checkpointing keeps

        def post(mod: Any, args: Any, out: Any, i: int = i) -> None:
            current.pop()

        hooks.append(b.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(b.register_forward_hook(post))
    ids = torch.zeros((batch, src_len), dtype=torch.long, device="meta")
    labels = torch.zeros((batch, tgt_len), dtype=torch.long, device="meta")
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, use_cache=False)
            # the loss as the recipe computes it: fp32 logits (B, T, V) for the cross-entropy
            logits = out.logits.float()
            torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1))
    finally:
        for h in hooks:
            h.remove()
    shapes = tuple(tuple(p.shape) for p in model.parameters())
    return Shape(params, root, biggest, outside, sum(inputs), max(per_block), outside + sum(per_block), shapes)


def rows(shape: Shape, *, optimizer: str = "adamw", checkpointing: bool = True) -> list[Row]:
    """One row per SETUPS entry."""
    from rsg_eval.engine.optim import state_bytes

    act = (shape.outside + shape.block_inputs + shape.block_peak) if checkpointing else shape.all_saved
    # the optimizer's state from its factory, by parameter shape (Adafactor's factored moments depend on them)
    opt = float(state_bytes(shape.shapes or [(shape.params,)], optimizer))
    weights, grads = 4.0 * shape.params, 4.0 * shape.params
    out = []
    for label, n, card, mode, offload in SETUPS:
        share = n if mode == "fsdp" else 1
        w, g, o = weights / share, grads / share, opt / share
        working = 0.0
        if mode == "fsdp":
            gathered = shape.root_params + 2 * shape.block_params
            working = gathered * 2 + gathered * 4   # bf16 gathered weights + their fp32 gradients before reduce
        cpu = 0.0
        if offload:
            cpu = w + g + o
            w = g = o = 0.0
        total = w + g + o + working + act
        out.append(Row(label, n, card, w / GIB, g / GIB, o / GIB, working / GIB, act / GIB, total / GIB,
                       cpu / GIB, total / GIB <= 0.9 * card * 1e9 / GIB))
    return out


def markdown(table: list[Row], shape: Shape, *, batch: int, src_len: int, tgt_len: int, optimizer: str,
             checkpointing: bool) -> str:
    """The table as docs/finetune.md shows it."""
    head = (f"FRED-T5-1.7B ({shape.params / 1e9:.2f} B parameters), {optimizer}, batch {batch} x {src_len} "
            f"(targets {tgt_len}) per GPU, gradient checkpointing {'on' if checkpointing else 'off'}, bf16 "
            f"autocast; GiB per GPU, **computed, not measured** (rsg bench memory, meta device)\n\n")
    lines = ["| setup | weights | gradients | optimizer | FSDP working set | activations | total per GPU | "
             "CPU per process | fits (90 % of the card) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r.setup} | {r.weights:.1f} | {r.grads:.1f} | {r.optimizer:.1f} | {r.working:.1f} | "
                     f"{r.activations:.1f} | {r.total:.1f} | {r.cpu:.1f} | {'yes' if r.fits else 'no'} |")
    return head + "\n".join(lines) + "\n"


def as_json(table: list[Row], shape: Shape) -> dict[str, Any]:
    info = {k: v for k, v in asdict(shape).items() if k != "shapes"}
    return {"shape": info, "rows": [asdict(r) for r in table], "computed_not_measured": True}


def optimizer_comparison(shape: Shape, *, checkpointing: bool = True) -> str:
    """AdamW and Adafactor side by side for FRED-T5-1.7B on one 80 GB card (computed from the shapes), then both
    measured on CPU after one real step of a small T5 (the optimizers' state tensors, counted), next to the
    formula: the check that the computed column is right."""
    lines = ["| optimizer | FRED-T5-1.7B states, GiB (computed) | total on one 80 GB card, GiB | small T5 states, "
             "MiB (measured on CPU) | same, computed |", "|---|---|---|---|---|"]
    small = measured_small_states()
    for name in ("adamw", "adafactor"):
        one = rows(shape, optimizer=name, checkpointing=checkpointing)[0]
        got, want = small[name]
        lines.append(f"| {name} | {one.optimizer:.2f} | {one.total:.1f} | {got / 2**20:.3f} | {want / 2**20:.3f} |")
    return "\n".join(lines) + "\n"


def measured_small_states() -> dict[str, tuple[int, int]]:
    """{optimizer: (bytes its state tensors hold after one step, bytes state_bytes computes)} for the benches'
    small T5 (d_model 256, 4 + 4 layers) on CPU; AdamW's computed figure plus its per-tensor step counters."""
    import copy

    import torch

    from rsg_eval.engine.optim import make_optimizer, measured_state_bytes, param_groups, state_bytes
    from rsg_eval.models.tiny import build_tiny

    base, tok = build_tiny(d_model=256, d_ff=1024, num_heads=4, d_kv=64, num_layers=4)
    batch = tok(["<LM>Девочка открыла окно."], return_tensors="pt")
    labels = torch.tensor([[5, 6, 2]])
    out: dict[str, tuple[int, int]] = {}
    for name in ("adamw", "adafactor"):
        model = copy.deepcopy(base).train()
        opt = make_optimizer(param_groups(model, 0.01), name=name, lr=1e-3)
        model(**batch, labels=labels).loss.backward()
        opt.step()
        shapes = [tuple(p.shape) for p in model.parameters()]
        want = state_bytes(shapes, name) + (4 * len(shapes) if name == "adamw" else 0)
        out[name] = (measured_state_bytes(opt), want)
    return out

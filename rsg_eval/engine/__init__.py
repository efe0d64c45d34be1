"""The training engine both recipes (rsg_eval.training.finetune, rsg_eval.training.hmtl) share, and that zero-shot
scoring uses for its process layout:

    runtime     process layout (Dist), init from torchrun / accelerate with a timeout, the device rule, the bf16 rule
    collective  the only torch.distributed calls (with sharding): sums, gathers, "rank 0 acts, every rank learns"
    sharding    none | ddp | fsdp (FSDP2 fully_shard per block), full state dicts for checkpoints
    optim       the optimizer factory (AdamW param groups, fused where it can)
    step        finish_step: clip, one host read, non-finite guard, optimizer and schedule step
    stop        stop at a step boundary on SIGINT / SIGTERM (exit 130 / 143)
    checkpoint  atomic checkpoint folders (safetensors weights, weights_only trainer state)
    rng         per-rank RNG capture (python, numpy, torch, cuda) as JSON, restored on resume

Import the submodules directly; this package imports nothing.
"""

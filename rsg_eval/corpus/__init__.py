"""`rsg build-corpus`: readers, cleaning, deduplication, automatic annotation, the leakage guard, and the writer
of the multi-task corpus that `rsg train-hmtl` reads (docs/design.md, "Multi-task corpus").

Only `annotate.py` needs torch/transformers, and it imports them inside its functions; the rest is light.
"""

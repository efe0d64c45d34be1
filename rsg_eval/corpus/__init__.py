"""The multi-task corpus: its schema (`records.TASK_FIELDS`) and the heads' labels (`labels`), the reader that
`rsg train-hmtl` and `--nli-head` use (`load`), and `rsg build-corpus`: readers, cleaning, deduplication, automatic
annotation, the leakage guard, and the writer (docs/design.md, "Multi-task corpus").

Only `annotate.py` and `teachers.py` need torch/transformers, and they import them inside their functions; the rest
is light.
"""

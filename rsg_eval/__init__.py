"""rsg-eval: Russian SuperGLUE evaluation and training for seq2seq models (FRED-T5 first).

Nothing heavy is imported here: `rsg --help` and the light commands must not pull in torch.
"""

__version__ = "0.1.0"

"""Analysis: comparing checkpoints and runs (`compare`, with the scoring of `minigpt2.model.evaluate`
and the drift of `minigpt2.model.snapshots`) and reporting it as text, JSON, PNG (`report`) and
HTML (`htmlreport`)."""

# compare.py's default for how much of each --text is scored: 32,768 tokens, about 15,000 Chinese
# characters (a few minutes for two 124M models on a 2-core CPU). Kept here, free of torch, so that
# compare.py parses its options (and answers --help or a typo) before importing anything heavy.
DEFAULT_MAX_EVAL_TOKENS = 32768

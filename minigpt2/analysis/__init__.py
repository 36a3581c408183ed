"""Analysis: comparing checkpoints and runs (`compare`, with the scoring of `minigpt2.model.evaluate`
and the drift of `minigpt2.model.snapshots`) and reporting it as text, JSON, PNG (`report`) and
HTML (`htmlreport`)."""

# compare.py's default for how much of each --text is scored: 32,768 tokens, about 15,000 Chinese
# characters (a few minutes for two 124M models on a 2-core CPU). Kept here, free of torch, so that
# compare.py parses its options (and answers --help or a typo) before importing anything heavy.
DEFAULT_MAX_EVAL_TOKENS = 32768

# How much of each --text the transplants and the logit lens read: they cost about 63 evaluations per
# text on 124M (2 x (12 + 2) transplants, 2 x 13 read-outs, the copies; benchmarks/bench_compare.py), so
# at the scoring cap they would take hours on a CPU. 1,024 tokens: minutes, and ~500 Chinese characters.
DEFAULT_LAYER_TOKENS = 1024

# The questions a notebook asks of two models (minigpt2.analysis.causal), imported on first use so
# that importing this package stays free of torch.
CAUSAL = ("layer_attribution", "logit_lens", "where_changed", "shares", "transplanted", "Transplanter", "units")


def __getattr__(name: str):
    if name in CAUSAL:
        from minigpt2.analysis import causal

        return getattr(causal, name)
    if name == "capture_block_outputs":
        from minigpt2.model.snapshots import capture_block_outputs

        return capture_block_outputs
    raise AttributeError(f"module 'minigpt2.analysis' has no attribute '{name}'")

"""Generation: the token loop over a KV cache (`generate`), prompts in and whole-character samples
out (`sampling`), and the UTF-8 guard that never lets a sample hold a broken character (`utf8`)."""

# The samples that watch a model (train.py at every evaluation, compare.py for both sides): this many
# new tokens (--sample-tokens' default: a line of text, a second or two of a 124M model on a CPU),
# drawn with this seed, so that what changes between two of them is the model. Kept here, free of
# torch, so that parsing options imports nothing heavy: `--help` and a mistyped option answer at once.
SAMPLE_TOKENS = 32
SAMPLE_SEED = 0

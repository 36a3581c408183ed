"""A model's files: where they come from (`hub`), reading and writing checkpoints (`weights`), PEFT's
adapter files (`adapter`), a training run's folder as a reader sees it (`runs`), the tokenizer
(`tokenizer`) and learning new merges for it (`bpe`)."""

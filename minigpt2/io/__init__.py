"""A model's files: where they come from (`hub`), reading and writing checkpoints (`weights`), the
tokenizer (`tokenizer`) and growing it for new text (`bpe`, `vocab`)."""

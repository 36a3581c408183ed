"""Generation: the token loop over a KV cache (`generate`), prompts in and whole-character samples
out (`sampling`), and the UTF-8 guard that never lets a sample hold a broken character (`utf8`)."""

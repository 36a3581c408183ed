"""Continue GPT-2's byte-level BPE on new text: learn merges of existing tokens, N at a time.

GPT-2's 50,000 merges were learned on English web text, so Chinese costs it ~2.1 tokens per
character, most of them fragments of a character. Learning more merges *on top of* GPT-2's, from
the user's own text, gives whole characters and common words their own tokens while every old
token keeps its id (so a trained model can be grown instead of retrained; see vocab.py).

The algorithm is BPE training, started from GPT-2's output instead of from single bytes:

1. Split the text with GPT-2's pre-tokenizer (`GPT2_PATTERN`) and count the pieces: a word
   frequency table, so the text is read once and each distinct piece is handled once.
2. Turn each distinct piece into GPT-2's own tokens (what `encode_ordinary` gives for it).
3. Repeatedly merge the most frequent adjacent pair of tokens inside a piece into a new token.
   Pair counts are kept incrementally (pair -> count, pair -> the words holding it); a merge
   only revisits the words that contain its pair, never recounts everything. Memory holds the
   words and their pairs, and does not grow with the number of merges.

Ties: the pair with the highest count wins; among equal counts, the smallest (bytes, bytes)
pair (compare the left token's bytes, then the right's). Pairs seen only once are never merged.

THE TRAP, and why the learned merges cannot make tiktoken and transformers disagree
-----------------------------------------------------------------------------------
tiktoken ranks byte *strings*: it merges any adjacent pair whose concatenation is a token.
transformers ranks *pairs*: it merges only the pairs written in merges.txt. A learned token ABC
made from (AB, C) is reached by tiktoken from (A, BC) too, but not by transformers. So a merge
(A, B) -> T is accepted only if

  (a) T is not a token yet (else (A, B) would be a second way to spell an existing token);
  (b) no other split T = X + Y has both X and Y tokens already;
  (c) T is not a part of a split of an existing longer token: no token U = T + Y or U = X + T
      with the other part a token. Without (c), a merge learned later could give an old token a
      second split after the fact.

Rejected pairs are skipped for good and the next best pair is taken. The result, by induction
over the accepted merges:

- every new token has exactly one split into two tokens, its own merge;
- every old (GPT-2) token's splits use old tokens only, exactly as in GPT-2.

Then both tokenizers work in two phases on any piece. New tokens rank after every old one in
both (ids and merges.txt lines come after GPT-2's), and no adjacent pair involving a new token
concatenates to an old token (by (c)), so both first run GPT-2's own BPE to its end, where they
agree (tiktoken's GPT-2 encoding is transformers' GPT-2 tokenizer), and then apply new merges
only. In that second phase any adjacent pair whose concatenation is a token is that token's
listed pair (by (a)-(c)), so tiktoken's candidates are transformers' candidates with the same
ranks; merging (X, Y) -> T at rank r creates only pairs with T, whose merges rank after r (T had
to exist first), so tiktoken's one-at-a-time, leftmost-first merging and transformers'
all-occurrences-left-to-right merging take the same steps. tests/test_vocab.py checks it on
real text at 8,000 merges.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable

import regex

from minigpt2.io.tokenizer import GPT2_PATTERN

_PRETOKENIZER = regex.compile(GPT2_PATTERN)

# progress(what, done, total): called as a long phase advances (from done = 0 at its start), so a
# front end can say what is going on and how far it is. The counts are in the phase's own units.
Progress = Callable[[str, int, int], None]
READING = "reading the text (characters)"
SPLITTING = "splitting its distinct pieces into tokens"
LEARNING = "learning merges"


def no_progress(what: str, done: int, total: int) -> None:
    pass


def count_pretokens(texts: Iterable[str], progress: Progress | None = None, total_chars: int = 0) -> Counter[str]:
    """How often each piece of GPT-2's pre-tokenizer occurs in the texts (each text split alone).

    The texts may be chunks of one file, as long as they are cut where the pre-tokenizer cuts
    too (data.read_chunks does that). `progress` hears the characters done of `total_chars`.
    """
    progress = progress or no_progress
    counts: Counter[str] = Counter()
    done = 0
    progress(READING, 0, total_chars)
    for text in texts:
        counts.update(_PRETOKENIZER.findall(text))
        done += len(text)
        progress(READING, done, max(total_chars, done))
    return counts


class _MergeRules:
    """The tokens so far, and the checks (a)-(c) of the module docstring for a candidate merge."""

    def __init__(self, token_bytes: list[bytes]) -> None:
        self.tokens: set[bytes] = set(token_bytes)
        # Tokens (at least 2 bytes) by each of their proper prefixes and suffixes, for check (c).
        self.by_prefix: dict[bytes, list[bytes]] = defaultdict(list)
        self.by_suffix: dict[bytes, list[bytes]] = defaultdict(list)
        for token in token_bytes:
            self._index(token)

    def _index(self, token: bytes) -> None:
        for k in range(1, len(token)):
            self.by_prefix[token[:k]].append(token)
            self.by_suffix[token[k:]].append(token)

    def allows(self, left: bytes, right: bytes) -> bool:
        merged = left + right
        if merged in self.tokens:  # (a)
            return False
        for k in range(1, len(merged)):  # (b)
            if k != len(left) and merged[:k] in self.tokens and merged[k:] in self.tokens:
                return False
        n = len(merged)
        if any(u[n:] in self.tokens for u in self.by_prefix.get(merged, ())):  # (c) U = T + Y
            return False
        return not any(u[:-n] in self.tokens for u in self.by_suffix.get(merged, ()))  # (c) U = X + T

    def add(self, token: bytes) -> None:
        self.tokens.add(token)
        self._index(token)


def _pairs(word: list[int]) -> list[tuple[int, int]]:
    return list(zip(word, word[1:], strict=False))


def _merge_word(word: list[int], a: int, b: int, new: int) -> tuple[list[int], list[tuple], list[tuple]]:
    """`word` with each (a, b) replaced by `new`, left to right and without overlaps (as
    transformers does), and the pairs next to a merge that disappear and that appear (the merged
    pair itself may be among them: the caller drops it entirely).

    The neighbour on the left is taken from the word as merged so far: in [a, b, a, b] the
    second merge removes (new, a), which the first one added, and adds (new, new).
    """
    out: list[int] = []
    removed: list[tuple[int, int]] = []
    added: list[tuple[int, int]] = []
    i, n = 0, len(word)
    while i < n:
        try:
            j = word.index(a, i, n - 1)  # an `a` with room for a `b` after it
        except ValueError:
            out.extend(word[i:])
            break
        if word[j + 1] != b:
            out.extend(word[i : j + 1])
            i = j + 1
            continue
        out.extend(word[i:j])
        if out:
            removed.append((out[-1], a))
            added.append((out[-1], new))
        if j + 2 < n:
            removed.append((b, word[j + 2]))
            added.append((new, word[j + 2]))
        out.append(new)
        i = j + 2
    return out, removed, added


class _PairCounts:
    """Adjacent-pair counts over a weighted list of words, kept up to date merge by merge.

    A max-heap of (count, pair) picks the best pair. Entries go stale when a count changes; a
    fresh entry is pushed instead of updating in place, and stale ones are dropped when they
    surface (their count no longer matches). The heap is rebuilt when stale entries pile up, so
    memory stays proportional to the number of distinct pairs.
    """

    def __init__(self, words: list[list[int]], freqs: list[int], token_bytes: list[bytes]) -> None:
        self.words, self.freqs, self.token_bytes = words, freqs, token_bytes
        self.count: Counter[tuple[int, int]] = Counter()
        self.where: dict[tuple[int, int], set[int]] = defaultdict(set)
        for w, (word, freq) in enumerate(zip(words, freqs, strict=True)):
            for pair in _pairs(word):
                self.count[pair] += freq
                self.where[pair].add(w)
        self._rebuild()

    def _entry(self, pair: tuple[int, int]) -> tuple:
        a, b = pair
        return (-self.count[pair], self.token_bytes[a], self.token_bytes[b], a, b)

    def _rebuild(self) -> None:
        self.heap = [self._entry(p) for p in self.count]
        heapq.heapify(self.heap)

    def best(self, skip: set[tuple[int, int]]) -> tuple[tuple[int, int], int] | None:
        """The most frequent pair not in `skip` (ties: smallest bytes), and its count."""
        while self.heap:
            negative, _, _, a, b = self.heap[0]
            if self.count.get((a, b)) != -negative or (a, b) in skip:
                heapq.heappop(self.heap)
                continue
            return (a, b), -negative
        return None

    def discard(self, pair: tuple[int, int]) -> None:
        """Forget a pair that will never be merged (its heap entries go stale)."""
        self.count.pop(pair, None)
        self.where.pop(pair, None)

    def merge(self, pair: tuple[int, int], new: int) -> None:
        """Merge `pair` into token `new` in every word holding it, updating only the pairs around
        each merge. A word stays listed under a pair it may have lost (it merges to no change
        later), so these sets only ever grow by new pairs, which replace old ones: their total
        size is bounded by the corpus, not by the number of merges."""
        a, b = pair
        delta: Counter[tuple[int, int]] = Counter()
        for w in self.where.pop(pair, ()):
            freq = self.freqs[w]
            self.words[w], removed, added = _merge_word(self.words[w], a, b, new)
            for p in removed:
                delta[p] -= freq
            for p in added:
                delta[p] += freq
                self.where[p].add(w)
        self.count.pop(pair, None)
        for p, d in delta.items():
            if p == pair or d == 0:
                continue
            self.count[p] += d
            if self.count[p] > 0:
                heapq.heappush(self.heap, self._entry(p))
            else:
                self.discard(p)
        if len(self.heap) > 4 * len(self.count) + 100_000:
            self._rebuild()


def learn_merges_from_counts(
    pretokens: Counter[str] | dict[str, int], enc, n_merges: int, progress: Progress | None = None
) -> list[tuple[bytes, bytes]]:
    """`n_merges` new merges (pairs of token bytes, in order) from a pre-token frequency table.

    Fewer come back when no pair occurring at least twice is left. `enc` is the tiktoken
    encoding to continue (GPT-2's, or an already extended one). `progress` hears the pieces
    split into tokens, then the merges learned.
    """
    progress = progress or no_progress
    token_bytes = [enc.decode_single_token_bytes(i) if i != enc.eot_token else b"" for i in range(enc.n_vocab)]
    rules = _MergeRules([t for i, t in enumerate(token_bytes) if i != enc.eot_token])
    ordered = sorted(pretokens.items())  # a fixed word order: results never depend on dict order
    words = []
    for i, (piece, _) in enumerate(ordered):
        if i % 10_000 == 0:
            progress(SPLITTING, i, len(ordered))
        words.append(enc._encode_single_piece(piece.encode("utf-8")))
    progress(SPLITTING, len(ordered), len(ordered))
    counts = _PairCounts(words, [freq for _, freq in ordered], token_bytes)
    progress(LEARNING, 0, n_merges)

    merges: list[tuple[bytes, bytes]] = []
    rejected: set[tuple[int, int]] = set()
    while len(merges) < n_merges:
        found = counts.best(rejected)
        if found is None or found[1] < 2:
            break
        pair, _ = found
        left, right = token_bytes[pair[0]], token_bytes[pair[1]]
        if not rules.allows(left, right):
            rejected.add(pair)
            continue
        token_bytes.append(left + right)
        rules.add(left + right)
        counts.merge(pair, len(token_bytes) - 1)
        merges.append((left, right))
        if len(merges) % 100 == 0:
            progress(LEARNING, len(merges), n_merges)
    progress(LEARNING, n_merges, n_merges)  # done (also when fewer merges were found)
    return merges


def learn_merges(
    texts: Iterable[str], enc, n_merges: int, progress: Progress | None = None, total_chars: int = 0
) -> list[tuple[bytes, bytes]]:
    """Learn `n_merges` merges continuing `enc`'s BPE on `texts` (strings, or chunks of files)."""
    return learn_merges_from_counts(count_pretokens(texts, progress, total_chars), enc, n_merges, progress)

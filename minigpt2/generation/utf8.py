"""Never a broken character: a UTF-8 automaton that guards sampling, and a stream that decodes it.

GPT-2 generates bytes, not characters: a Chinese character is three UTF-8 bytes and usually two
or three tokens. Two things go wrong with a naive sampler, and this module fixes both:

- sampling can put a fragment where it does not fit (the start of a new character before the
  previous one is finished); the text then holds bytes that can never be valid. `Utf8Guard` masks,
  at every step, each token that would do that, so it is never drawn;
- decoding token by token prints half characters as U+FFFD. `Utf8Stream` holds the bytes of an
  unfinished character back until the rest arrives.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

import numpy as np
import torch

# A UTF-8 validator as a finite automaton over bytes. The states say what the bytes so far
# still owe: nothing (a character boundary), 1-3 continuation bytes, or one of the four lead
# bytes whose *next* byte has a narrower range (to forbid overlong forms and surrogates).
# Two more states refuse U+FFFD itself (EF BF BD): GPT-2's vocabulary has tokens that spell it,
# learned from web text that already held replacement characters.
ACCEPT, NEED1, NEED2, NEED3, AFTER_E0, AFTER_ED, AFTER_F0, AFTER_F4, AFTER_EF, AFTER_EFBF, REJECT = range(11)
N_STATES = 10  # the live states; REJECT is where invalid input goes


def _utf8_transitions() -> np.ndarray:
    """next_state[state, byte] for the UTF-8 automaton."""
    t = np.full((N_STATES + 1, 256), REJECT, dtype=np.int64)
    t[ACCEPT, 0x00:0x80] = ACCEPT  # ASCII
    t[ACCEPT, 0xC2:0xE0] = NEED1  # 2-byte characters
    t[ACCEPT, 0xE0] = AFTER_E0  # 3-byte: E0 must be followed by A0..BF
    t[ACCEPT, 0xE1:0xF0] = NEED2
    t[ACCEPT, 0xED] = AFTER_ED  # ED must be followed by 80..9F (no surrogates)
    t[ACCEPT, 0xF0] = AFTER_F0  # 4-byte: F0 must be followed by 90..BF
    t[ACCEPT, 0xF1:0xF4] = NEED3
    t[ACCEPT, 0xF4] = AFTER_F4  # F4 must be followed by 80..8F (nothing above U+10FFFF)
    t[ACCEPT, 0xEF] = AFTER_EF  # EF BF BD would be U+FFFD
    t[NEED1, 0x80:0xC0] = ACCEPT
    t[NEED2, 0x80:0xC0] = NEED1
    t[NEED3, 0x80:0xC0] = NEED2
    t[AFTER_E0, 0xA0:0xC0] = NEED1
    t[AFTER_ED, 0x80:0xA0] = NEED1
    t[AFTER_F0, 0x90:0xC0] = NEED2
    t[AFTER_F4, 0x80:0x90] = NEED2
    t[AFTER_EF, 0x80:0xC0] = NEED1
    t[AFTER_EF, 0xBF] = AFTER_EFBF
    t[AFTER_EFBF, 0x80:0xC0] = ACCEPT
    t[AFTER_EFBF, 0xBD] = REJECT
    return t


class Utf8Guard:
    """Allows only tokens whose bytes keep the generated text valid UTF-8.

    GPT-2's tokens are byte strings, and many are fragments of a multi-byte character. Sampling
    freely, the model can put a fragment where it does not fit, and the text then holds bytes
    that decode to U+FFFD. (U+FFFD spelled out by a token is refused as well.) The guard tracks
    each sequence's automaton state (what its pending bytes still owe) and, at each step, masks
    every token that would lead to an invalid byte.

    The work is done once per tokenizer: for every (state, token) pair, whether the token is
    allowed and which state it leads to, as two (10, vocab) tables. A step then only gathers one
    row of the table per sequence. `<|endoftext|>` and any ids the tokenizer lacks (a model
    with a padded vocabulary) are allowed only at a character boundary, or never.
    """

    def __init__(
        self,
        token_bytes: Sequence[bytes | None],
        special_ids: Sequence[int] = (),
        device: torch.device | str = "cpu",
    ) -> None:
        """token_bytes: each id's bytes (None: never allowed); special_ids: allowed at a boundary."""
        trans = _utf8_transitions()
        n = len(token_bytes)
        lengths = np.array([len(b) if b is not None else 0 for b in token_bytes])  # (vocab,)
        # The tokens longest first: those still going at byte j are then the first ones, a slice.
        order = np.argsort(-lengths, kind="stable")  # (vocab,)
        by_length = lengths[order]
        table = np.zeros((n, max(int(lengths.max()), 1)), dtype=np.uint8)  # (vocab, longest token), in `order`
        # Every token's bytes, left-aligned in its row, written at once: all the bytes in one string,
        # the row of each byte, and its place in the row (its index less where its token starts).
        data = np.frombuffer(b"".join(token_bytes[i] or b"" for i in order), dtype=np.uint8)  # (total bytes,)
        rows = np.repeat(np.arange(n), by_length)  # (total bytes,)
        places = np.arange(len(data)) - np.repeat(np.cumsum(by_length) - by_length, by_length)  # (total bytes,)
        table[rows, places] = data
        states = np.repeat(np.arange(N_STATES)[:, None], n, axis=1)  # (10, vocab): start state per row
        for j in range(table.shape[1]):  # advance every (state, token) pair one byte at a time
            live = int((by_length > j).sum())  # the tokens longer than j bytes
            states[:, :live] = trans[states[:, :live], table[:live, j]]
        states[:, order] = states.copy()  # back to id order
        states[:, lengths == 0] = REJECT  # no bytes: unknown ids
        special = [i for i in special_ids if i < n]
        states[:, special] = REJECT
        states[ACCEPT, special] = ACCEPT  # <|endoftext|> only at a character boundary
        self.next_state = torch.from_numpy(states).to(device)  # (10, vocab)
        self.forbidden = self.next_state == REJECT  # (10, vocab)
        # At the last step, only tokens that finish exactly on a character boundary.
        self.unfinished = self.next_state != ACCEPT  # (10, vocab)

    @classmethod
    def for_tokenizer(cls, enc, vocab_size: int, device: torch.device | str = "cpu") -> Utf8Guard:
        """The guard for a tiktoken encoding and a model with `vocab_size` logits."""
        specials = [enc.encode_single_token(t) for t in enc.special_tokens_set]
        token_bytes = [None if i in specials else _token_bytes(enc, i) for i in range(min(enc.n_vocab, vocab_size))]
        token_bytes += [None] * (vocab_size - len(token_bytes))  # ids the tokenizer cannot decode
        return cls(token_bytes, specials, device)

    def mask(self, logits: torch.Tensor, states: torch.Tensor, last_step: bool = False) -> torch.Tensor:
        """Set the logits (B, vocab) of forbidden tokens to -inf, given each row's state (B,)."""
        forbidden = (self.unfinished if last_step else self.forbidden)[states]  # (B, vocab)
        return logits.masked_fill(forbidden, float("-inf"))

    def advance(self, states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Each row's state after appending its token (B,)."""
        return self.next_state[states, tokens]


def _token_bytes(enc, i: int) -> bytes | None:
    try:
        return enc.decode_single_token_bytes(i)
    except KeyError:  # a hole in the vocabulary
        return None


class Utf8Stream:
    """Turns a stream of token bytes into text, holding back a character until it is complete.

    Decoding token by token with `bytes.decode` would print half characters (as U+FFFD) whenever
    a token ends inside a character. The incremental decoder keeps those bytes until the rest
    arrives; only bytes that can never become valid are shown as U+FFFD.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, data: bytes) -> str:
        return self._decoder.decode(data)

    def flush(self) -> str:
        """Whatever is left at the end (a dangling partial character shows as U+FFFD)."""
        return self._decoder.decode(b"", final=True)

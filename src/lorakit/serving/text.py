"""A request's output text, grown one token at a time, and its stop strings.

Decoding the whole output after every token costs O(n²) over a request. Here each token decodes
a short window: the tokens since the last text was released, with the few tokens before them as
context (a tokenizer may render a token differently at the start of a string, e.g. without its
leading space). The new text is the window's decoding minus the context's. While the window ends
inside a character (byte-level tokenizers split UTF-8; the decoder shows U+FFFD), nothing is
released and the window grows until the character is complete.

Stop strings are searched only in the text near its end, and text that might be the start of a
stop string is held back, so the released text never contains a stop string (or a piece of one).
"""

from __future__ import annotations

import bisect
import functools
from typing import Callable

INCOMPLETE = "\ufffd"


def decoder(tokenizer) -> Callable[[list[int]], str]:
    """``ids -> text`` as ``tokenizer.decode(ids, skip_special_tokens=True)`` gives it. For a fast
    (Rust) tokenizer whose class decodes as transformers' own base class does, and without
    ``clean_up_tokenization_spaces``, that is the Rust tokenizer's own decode, called directly: a
    third of the cost per token (the engine's thread decodes every token of every streamed request)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True)
            and type(tokenizer)._decode is _fast_base()._decode):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


@functools.cache
def _fast_base() -> type:
    """transformers' base class of fast tokenizers: TokenizersBackend in 5.x, PreTrainedTokenizerFast in 4.x."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
        return TokenizersBackend
    except ImportError:  # pragma: no cover - transformers 4.x
        from transformers import PreTrainedTokenizerFast
        return PreTrainedTokenizerFast


class IncrementalText:
    """The text of a growing token list, released in pieces; ``stopped`` once a stop string shows up.

    ``text`` is everything released so far: the decoding of the tokens, cut before the first stop
    string, with a possible stop-string prefix at its end held back until it is settled."""

    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.tokenizer = tokenizer
        self.decode = decoder(tokenizer)
        self.stops = stops
        self.tokens: list[int] = []
        self.context = 0        # tokens[context:released] render the context of the next window
        self.released = 0       # tokens before this index are in `decoded`
        self.decoded = ""       # the decoding of tokens[:released]
        self.text = ""          # decoded, cut before a stop string, minus a held-back tail
        self.head = ""          # the decoding of tokens[context:released]
        self.ends: list[int] = []  # per settled token: len(decoded) once it is in (see `tokens_for`)
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; return the text this releases ("" while a character or a stop is pending)."""
        if self.stopped:
            raise RuntimeError("this request's text has stopped; no more tokens can be added")
        self.tokens.append(token)
        window = self._decode(self.tokens[self.context:])
        if window.endswith(INCOMPLETE) and len(self.tokens) - self.released < 8:
            return ""  # a character split over tokens: wait for the rest (a few tokens at most)
        self._settle(window)
        return self._release()

    def finish(self) -> str:
        """No more tokens: release what is pending (a held-back tail did not become a stop string)."""
        if self.stopped:
            return ""
        if self.released < len(self.tokens):
            self._settle(self._decode(self.tokens[self.context:]))
        new = self.decoded[len(self.text):]
        self.text = self.decoded
        return new

    def tokens_for(self, length: int) -> int:
        """The fewest tokens whose decoding holds the first ``length`` characters of the text: the
        tokens that made a text cut there (those after it made only a stop string, or nothing yet)."""
        if length <= 0:
            return 0
        return min(bisect.bisect_left(self.ends, length) + 1, len(self.ends))

    def _settle(self, window: str) -> None:
        """tokens[context:] decode to ``window``: append its part past the context's own decoding."""
        before = len(self.decoded)
        self.decoded += window[len(self.head):]
        # the tokens of one character split over several end where it ends; those before it add nothing
        self.ends += [before] * (len(self.tokens) - len(self.ends) - 1) + [len(self.decoded)]
        self.context, self.released = self.released, len(self.tokens)
        self.head = self._decode(self.tokens[self.context:self.released])
        # a context that renders nothing (a skipped special token) loses the next word's leading
        # separator: reach back to a token that renders something (a few at most)
        while self.context > max(self.released - 8, 0) and not self.head:
            self.context -= 1
            self.head = self._decode(self.tokens[self.context:self.released])

    def _release(self) -> str:
        # a stop string starts in the held-back tail or the new text: the released text has none, and
        # no end of it begins one (else that end would have been held back)
        found = [i for i in (self.decoded.find(s, len(self.text)) for s in self.stops) if i >= 0]
        if found:
            end, self.stopped = min(found), True
        else:
            end = len(self.decoded) - self._pending_stop(self.decoded)
        new = self.decoded[len(self.text):end]
        self.text += new
        return new

    def _pending_stop(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string (held back for now)."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _decode(self, tokens: list[int]) -> str:
        return self.decode(tokens) if tokens else ""

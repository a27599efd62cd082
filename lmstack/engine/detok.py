"""Streaming text from token ids: incremental detokenization and stop strings.

:class:`IncrementalDetokenizer` turns tokens into text as they arrive. Byte-level tokenizers split
multi-byte UTF-8 characters across tokens, so it decodes *bytes* (``tokenizer.decode_bytes``) and
emits only the longest complete UTF-8 prefix, holding the incomplete tail back until the next
token completes it (a sequence that ends on a broken character gets U+FFFD on ``flush``). Text that
ends in U+FFFD is held back too: tokenizers that decode through text (sentencepiece byte fallback)
report an unfinished character that way. It
decodes a short window of recent tokens rather than single tokens, which keeps tokenizers whose
pieces depend on their left neighbour (sentencepiece's leading-space marker) correct, and costs
O(window) per token instead of re-decoding the whole sequence.

:class:`TextStream` adds stop strings on top: the text is searched for every stop string (also
across token boundaries, since the search runs on the accumulated text); on a match the text is
cut just before it and the stream ends. While generating, the stream holds back any tail of the
text that could still grow into a stop string, so a stop string never leaks into streamed output.
"""

from __future__ import annotations

from typing import Any, Sequence

# tokens of left context kept when decoding incrementally
_WINDOW = 6
_REPLACEMENT = "\ufffd".encode()


def _complete_utf8_prefix(data: bytes) -> int:
    """Length of the longest prefix of ``data`` that does not end inside a UTF-8 character."""
    n = len(data)
    # look back at most 3 bytes for the lead byte of an unfinished character
    for back in range(1, min(4, n) + 1):
        b = data[n - back]
        if b & 0xC0 == 0x80:  # continuation byte: keep looking for the lead byte
            continue
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
        return n if back >= need else n - back
    return n


class IncrementalDetokenizer:
    """Feed token ids one at a time; get back the newly complete text each time."""

    def __init__(self, tokenizer: Any, context_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        # a little left context (the end of the prompt) so the first token decodes as it would in place
        self._ids: list[int] = list(context_ids[-_WINDOW:])
        self._prefix = len(self._ids)  # tokens before this index are already emitted (or context)
        self._prefix_bytes = self.tokenizer.decode_bytes(self._ids) if self._ids else b""

    def add(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        data = self.tokenizer.decode_bytes(self._ids)
        new = data[len(self._prefix_bytes):]  # the window's bytes beyond what was already emitted
        cut = _complete_utf8_prefix(new)
        # tokenizers that decode to text (sentencepiece byte fallback) show an unfinished character as
        # U+FFFD instead of raw bytes: hold that back too until a later token completes it
        if cut == 0 or new[:cut].endswith(_REPLACEMENT):
            return ""
        # commit: everything up to the cut becomes the new prefix; trim the window
        self._prefix_bytes = data[:len(self._prefix_bytes) + cut]
        text = new[:cut].decode("utf-8", errors="replace")
        if cut == len(new) and len(self._ids) > _WINDOW:
            keep = self._ids[-_WINDOW:]
            self._ids = keep
            self._prefix_bytes = self.tokenizer.decode_bytes(keep)
        return text

    def flush(self) -> str:
        """Whatever is held back (an unfinished character) as text with U+FFFD replacement."""
        data = self.tokenizer.decode_bytes(self._ids)
        rest = data[len(self._prefix_bytes):]
        self._prefix_bytes = data
        return rest.decode("utf-8", errors="replace")


class TextStream:
    """Detokenized text of one generated sequence with stop-string handling.

    ``add(token_id) -> (delta, stopped)``: the text that may be shown now and whether a stop string
    matched. ``finish() -> delta`` releases the held-back tail when generation ends for another reason.
    ``text`` is everything released so far.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = (), context_ids: Sequence[int] = ()):
        self.detok = IncrementalDetokenizer(tokenizer, context_ids)
        self.stop = [s for s in stop if s]
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self._all = ""  # all decoded text (including the held-back tail)
        self.text = ""  # released text
        self.stopped = False

    def add(self, token_id: int, skip_text: bool = False) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        piece = "" if skip_text else self.detok.add(token_id)
        if not piece:
            return "", False
        start = max(0, len(self._all) - self._max_stop + 1)
        self._all += piece
        if self.stop:
            hits = [i for s in self.stop if (i := self._all.find(s, start)) >= 0]
            if hits:
                self._all = self._all[:min(hits)]
                self.stopped = True
                return self._release(len(self._all)), True
        return self._release(len(self._all) - self._held_back()), False

    def finish(self) -> str:
        if not self.stopped:
            self._all += self.detok.flush()
        return self._release(len(self._all))

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        for n in range(min(self._max_stop - 1, len(self._all)), 0, -1):
            tail = self._all[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def _release(self, upto: int) -> str:
        upto = max(upto, len(self.text))
        delta = self._all[len(self.text):upto]
        self.text = self._all[:upto]
        return delta

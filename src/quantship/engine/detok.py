"""Incremental detokenization: each new token's text from a short window of tokens, not the whole output.

Decoding token by token is wrong for two reasons: a multi-byte UTF-8 character can span several
byte-level tokens (decoding one of them alone gives U+FFFD), and some decoders change a token's text
by its neighbours (a SentencePiece word-start space is dropped at the start of a sequence). So, as in
vLLM's `detokenize_incrementally`, two offsets into the output move forward:

    tokens  [ .... emitted .... | prefix_offset ... read_offset | new ... ]
    prefix_text = decode(tokens[prefix_offset:read_offset])   (context, already emitted)
    full_text   = decode(tokens[prefix_offset:])
    new text    = full_text[len(prefix_text):], held back while it ends in U+FFFD (an incomplete
                  character); once emitted, prefix_offset <- read_offset, read_offset <- len(tokens)

Each token costs two decodes of a few tokens, whatever the output's length. `flush()` emits what is
held back (a stream that ends inside a character), so the concatenation of everything emitted equals
`tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)`: always for
byte-level BPE (GPT-2, SmolLM2, Qwen); for byte-fallback tokenizers (Llama-style SentencePiece) when the
output ends on a whole character (their decoder turns a cut run of byte tokens into one U+FFFD per
byte, characters of the run that were complete, and already streamed, included).
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> str:
        """Add one token; -> the text it completes ("" while a character is still incomplete)."""
        self.tokens.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """-> the text held back (an incomplete character at the end decodes as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read_offset == len(self.tokens):
            return ""
        prefix_text = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.tokens[self.prefix_offset:])
        if not final and (len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT)):
            return ""  # nothing new yet (a special token, or a character still incomplete)
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        return full_text[len(prefix_text):]

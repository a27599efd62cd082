"""Special tokens and the layout of a vocabulary we train: which ids are special, and how many ids there may be.

    from lmstack.tokenizer.special import EOT, USER, special_token_list
    special_token_list(40)   # ['<|endoftext|>', '<|pad|>', …, '<|sentinel_15|>', '<|reserved_0|>', …]

Every vocabulary lmstack trains reserves a block of special tokens at the top of its id range
(``vocab_size`` counts them): ``<|endoftext|>`` (document boundary, also the BOS of a chat), ``<|pad|>``,
the chat tokens ``<|system|> <|user|> <|assistant|> <|end|> <|tool_call|> <|tool_result|>``, ``<|mask|>``
(masked LM), ``<|sentinel_0|>`` … ``<|sentinel_15|>`` (span corruption / blank infilling), then
``<|reserved_N|>`` to fill the rest, at least :data:`MIN_RESERVED` of them so later stages can claim a few
ids without resizing the embedding.

Imported tokenizers name their tokens differently; :data:`DOCUMENT_BOUNDARY_NAMES` and
:data:`END_OF_TURN_NAMES` are the well-known spellings tried, in order of preference, when a file does not
say which token ends a document or a turn.
"""

from __future__ import annotations

EOT = "<|endoftext|>"
PAD = "<|pad|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"
TOOL_CALL = "<|tool_call|>"
TOOL_RESULT = "<|tool_result|>"
MASK = "<|mask|>"
NUM_SENTINELS = 16
MIN_RESERVED = 7
SENTINELS: tuple[str, ...] = tuple(f"<|sentinel_{i}|>" for i in range(NUM_SENTINELS))
NAMED_SPECIAL_TOKENS: tuple[str, ...] = (EOT, PAD, SYSTEM, USER, ASSISTANT, END, TOOL_CALL, TOOL_RESULT, MASK,
                                         *SENTINELS)
NUM_SPECIAL_TOKENS = len(NAMED_SPECIAL_TOKENS) + MIN_RESERVED  # 32: the fewest specials a trained vocab holds

# The largest vocabulary lmstack trains or loads. Published vocabularies stay below it (the largest in use
# are about 256k ids, Gemma's; XLM-V's, about 900k, is the largest we know of), and an embedding of 2^20
# rows is already 0.8 B parameters at width 768. Above it a vocabulary is a typo
# (`--vocab-size 1000000000` once filled 23 GB with reserved-token names before anything was learned).
MAX_VOCAB_SIZE = 1 << 20

# well-known names, in order of preference, when a tokenizer does not say which token is which
DOCUMENT_BOUNDARY_NAMES = (EOT, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")
END_OF_TURN_NAMES = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", END, "<end_of_turn>", "<|end_of_turn|>")


def special_token_list(count: int) -> list[str]:
    """The special tokens of a trained vocabulary with ``count`` reserved ids: named ones, then reserved."""
    if count < NUM_SPECIAL_TOKENS:  # callers derive count from a checked vocab_size: this is a bug, not input
        raise ValueError(f"a trained vocabulary reserves at least {NUM_SPECIAL_TOKENS} special tokens, got {count}")
    return [*NAMED_SPECIAL_TOKENS, *(f"<|reserved_{i}|>" for i in range(count - len(NAMED_SPECIAL_TOKENS)))]

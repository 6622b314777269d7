"""Byte-level tokenizer for the built-in demo model.

Ids 0..255 are the UTF-8 bytes of the text; four special ids follow. Encoding is
exact and needs no vocabulary file, so the demo runs with nothing downloaded and a
prompt of N ASCII characters is exactly N tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

PAD_ID = 256
BOS_ID = 257
EOS_ID = 258
SEP_ID = 259
SPECIAL_TOKENS = {PAD_ID: "<pad>", BOS_ID: "<bos>", EOS_ID: "<eos>", SEP_ID: "<sep>"}
VOCAB_SIZE = 260


class ByteTokenizer:
    """`encode(text) -> list[int]` and `decode(ids) -> str` over UTF-8 bytes plus a few special ids."""

    pad_token_id = PAD_ID
    bos_token_id = BOS_ID
    eos_token_id = EOS_ID
    sep_token_id = SEP_ID
    vocab_size = VOCAB_SIZE

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text: expected a str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        if add_bos:
            ids.insert(0, BOS_ID)
        if add_eos:
            ids.append(EOS_ID)
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """Bytes back to text; special ids are dropped (or spelled like `<eos>`); bad UTF-8 becomes U+FFFD."""
        out = bytearray()
        pieces: list[str] = []
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                out.append(i)
            elif i in SPECIAL_TOKENS:
                if not skip_special_tokens:
                    pieces.append(out.decode("utf-8", errors="replace"))
                    pieces.append(SPECIAL_TOKENS[i])
                    out.clear()
            else:
                raise ValueError(f"ids: expected token ids in 0..{VOCAB_SIZE - 1}, got {i}")
        pieces.append(out.decode("utf-8", errors="replace"))
        return "".join(pieces)

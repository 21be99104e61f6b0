"""The byte-level fixtures' Hugging Face tokenizer gives exactly the evaluator's byte ids and decodes back."""

from __future__ import annotations

from pathlib import Path

from factors.byte_tokenizer import write_byte_tokenizer
from factors.corpus import stdlib_text


def test_ids_are_the_utf8_bytes_and_decode_back(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    write_byte_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == 256
    text = stdlib_text("heldout", 200_000) + "é ü 日本 \x00\x7f\t\r\n  trailing  "
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(list(range(256))).encode("utf-8", errors="surrogateescape")  # every id decodes

"""A Hugging Face tokenizer for the byte-level fixtures (token id = UTF-8 byte), so vLLM and transformers
can serve them with text prompts: ids equal ``Evaluator.tokenize``'s bytes exactly, and decoding gives the
text back.

Byte-level BPE without merges: every byte is mapped to one printable character (GPT-2's reversible byte
alphabet) whose vocabulary id is the byte's value.
"""

from __future__ import annotations

from pathlib import Path


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes to printable characters (the printable Latin-1 ones map to
    themselves, the rest to 256 + k)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _byte_alphabet().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)


def write_byte_tokenizer(folder: str | Path) -> None:
    """tokenizer.json and tokenizer_config.json for a vocab-256 byte model in ``folder``."""
    byte_tokenizer().save_pretrained(str(folder))

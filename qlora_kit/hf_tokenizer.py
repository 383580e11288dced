"""The built-in byte tokenizer as a Hugging Face tokenizer, so a merged model directory loads with
``AutoTokenizer.from_pretrained`` like any other.

:class:`qlora_kit.data.ByteTokenizer` maps each UTF-8 byte to its value (ids 0..255, id 0 = end of
document). The same mapping in ``tokenizers`` terms: byte-level pre-tokenization (each byte becomes one
printable character, GPT-2's table) and a BPE model with no merges whose vocabulary sends the character of
byte b to id b. ``tokenizers`` is a dependency of transformers.

Example:
    >>> save_tokenizer(ByteTokenizer(), "merged")  # doctest: +SKIP
    >>> AutoTokenizer.from_pretrained("merged")("hé")["input_ids"]  # doctest: +SKIP
    [104, 195, 169]
"""

from __future__ import annotations

from pathlib import Path


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table (the one ``tokenizers``' ByteLevel pre-tokenizer uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def byte_tokenizer_hf():
    """A ``PreTrainedTokenizerFast`` that encodes exactly as :class:`qlora_kit.data.ByteTokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = _byte_chars()
    vocab = {c: b for b, c in enumerate(chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    eos = chars[0]  # byte 0 (NUL): the documents' separator, absent from text
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos, model_max_length=10**9)


def save_tokenizer(tokenizer, directory: str | Path) -> bool:
    """Save ``tokenizer`` into ``directory`` (the byte tokenizer as its HF equivalent); False if it cannot be."""
    from .data import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        tokenizer = byte_tokenizer_hf()
    if not hasattr(tokenizer, "save_pretrained"):
        return False
    tokenizer.save_pretrained(str(directory))
    return True

"""A byte-level stand-in for Wan's umT5 tokenizer, built offline for the tiny model.

Every UTF-8 byte is one token (ids 3..258), after T5's special tokens <pad>=0, </s>=1, <unk>=2, and every
text ends with </s> as T5's does. It saves and loads like any Hugging Face fast tokenizer, so a tiny
"pretrained" folder can hold it next to the tiny weights.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
BYTE_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256


def build_tiny_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """The byte-level tokenizer; `vocab_size` is the text encoder's (ids above 258 are never produced)."""
    if vocab_size < BYTE_VOCAB_SIZE:
        raise ValueError(f"a byte-level tokenizer needs vocab_size >= {BYTE_VOCAB_SIZE}, got {vocab_size}")
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    # ByteLevel pre-tokenisation spells each byte as one printable character; id = 3 + byte value.
    for byte, char in sorted(bytes_to_unicode().items()):
        vocab[char] = len(SPECIAL_TOKENS) + byte
    # BPE without merges never joins characters, so each byte stays its own token.
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="right",
    )

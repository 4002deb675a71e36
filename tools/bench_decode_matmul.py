"""The products of one CPU decode step, kernel against kernel: how fast each streams the weights.

A decode step multiplies B rows by every weight matrix of the model, each once. One matrix timed in a
loop sits in the last-level cache and flatters every kernel, so this takes a model's worth of the
layers' matrices in turn (SmolLM2-135M's MLP by default: 90 of 1,536 × 576, 318 MB), as a decode step
meets them, and times each kernel over them, interleaved for --rounds rounds:
- mkl: nn.Linear's product, x @ Wᵀ, on the plain (out, in) weight (MKL's sgemm);
- onednn: oneDNN's linear on the plain weight;
- onednn reordered: oneDNN's linear on the weight reordered into its blocked layout, as minirl.generate
  decodes on an x86 CPU (generate.packed_weight).
It prints each kernel's rate in GB/s of weights and its ratio to mkl's, the figure to quote: the
machine is shared, and the ratio is measured in one run; and the one-off cost of the reordering, in
mkl passes over the same matrices.

    OMP_NUM_THREADS=1 python tools/bench_decode_matmul.py                 # batch 8
    OMP_NUM_THREADS=1 python tools/bench_decode_matmul.py --batch 50
"""

import argparse
import statistics
import time

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8, help="rows per product (the decode batch)")
    ap.add_argument("--out-features", type=int, default=1536)
    ap.add_argument("--in-features", type=int, default=576)
    ap.add_argument("--matrices", type=int, default=90, help="matrices taken in turn (30 layers × 3 for SmolLM2)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    weights = [torch.randn(args.out_features, args.in_features) for _ in range(args.matrices)]
    x = torch.randn(args.batch, args.in_features)

    def onednn(w):
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")

    start = time.perf_counter()
    reordered = [torch.ops.mkldnn._reorder_linear_weight(w, args.batch) for w in weights]
    reordering = time.perf_counter() - start
    kernels = {"mkl": (lambda w: x @ w.t(), weights), "onednn": (onednn, weights), "onednn reordered": (onednn, reordered)}
    seconds = {name: [] for name in kernels}
    for _ in range(args.rounds):
        for name, (product, ws) in kernels.items():
            product(ws[0])
            start = time.perf_counter()
            for w in ws:
                product(w)
            seconds[name].append(time.perf_counter() - start)
    gigabytes = args.matrices * args.out_features * args.in_features * 4 / 1e9
    print(f"{args.matrices} matrices of {args.out_features} × {args.in_features} (fp32, {gigabytes * 1e3:.0f} MB), "
          f"batch {args.batch}, {args.threads} thread(s), median of {args.rounds} rounds")
    base = statistics.median(seconds["mkl"])
    for name, times in seconds.items():
        t = statistics.median(times)
        print(f"{name:18s} {gigabytes / t:6.2f} GB/s   {base / t:5.2f}× mkl")
    print(f"reordering them once took {reordering / base:.1f}× one mkl pass over them")


if __name__ == "__main__":
    main()

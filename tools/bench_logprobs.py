"""Time and peak memory of gathered log-probs: the naive reference, the PyTorch path, the Triton kernel.

Every method computes logp = log_softmax(H Wᵀ / τ)[i, t_i] for N rows and backpropagates Σ u_i·logp_i
to H (N × D) and W (V × D), at Qwen2-1.5B's shape (D = 1536, V = 151,936) for N from 512 to 16,384:

    naive    H Wᵀ, log_softmax, gather, autograd: several N×V tensors
    torch    minirl.kernels.gathered_logprobs with MINIRL_LOGPROBS=torch (the path CPUs take)
    triton   minirl.kernels.gathered_logprobs on CUDA (the fused kernels)
    matmul   the plain products it cannot beat: logits = H Wᵀ (forward), dH = G W and dW = Gᵀ H (backward)

Printed per (N, method): forward time and its ratio to one plain product; forward + backward time and
its ratio to the three plain products (aim: ≤ 1.5); extra memory and its ratio to the naive
reference's (aim: ≤ 5 %). Times include dW; memory is measured as the RL losses run it, W frozen
(LoRA leaves lm_head alone), since dW alone (V·D) would outweigh any N×V workspace at small N.
Extra memory is the peak above what the inputs already hold (dH included): on CUDA
torch.cuda.max_memory_allocated; on the CPU the peak resident set (VmHWM) of a fresh process per
measurement, above its resident set once the inputs exist and one small warm-up run is done, with
glibc told to map large blocks separately so that freed tensors leave the resident set.
With --scale s, N·V shrinks by s², and so does the fused path's workspace (fused_logprobs.WORKSPACE),
so that every ratio is the one the full shape would give.

    python tools/bench_logprobs.py --small                      # CPU: every size ÷ 8, one thread
    python tools/bench_logprobs.py --device cuda --dtype bf16   # the full shape on a GPU
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

ROWS = (512, 1024, 2048, 4096, 8192, 16384)
D_FULL, V_FULL = 1536, 151936
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def naive(h, w, t, tau):
    logits = (h @ w.T).float() / tau  # (N, V)
    return torch.log_softmax(logits, dim=-1).gather(1, t[:, None])[:, 0]


def fused(h, w, t, tau):
    from minirl.kernels import gathered_logprobs

    return gathered_logprobs(h, w, t, tau)


def make_inputs(N, D, V, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).to(dtype=dtype, device=device).requires_grad_(True)
    w = (torch.randn(V, D, generator=g) / D**0.5).to(dtype=dtype, device=device).requires_grad_(True)
    t = torch.randint(0, V, (N,), generator=g).to(device)
    u = torch.randn(N, generator=g).to(device)
    return h, w, t, u


def step(method, h, w, t, u, tau, backward=True):
    """One forward (+ backward) of `method`; leaves gradients in h.grad (and w.grad if W requires it)."""
    h.grad = w.grad = None
    if method == "matmul":
        with torch.no_grad():
            logits = h @ w.T  # (N, V)
            if backward:
                G = logits  # any N×V operand will do: the cost is the products
                h.grad = G @ w  # (N, D)
                if w.requires_grad:
                    w.grad = G.T @ h  # (V, D)
            del logits
        return
    fn = naive if method == "naive" else fused
    if not backward:
        with torch.no_grad():
            fn(h, w, t, tau)
        return
    (fn(h, w, t, tau) * u).sum().backward()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(method, inputs, tau, backward, repeats, device):
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        step(method, *inputs, tau, backward)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def proc_status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024


def measure(method, N, D, V, dtype, device, tau, repeats, scale):
    """{fwd_s, fwdbwd_s, extra_bytes} of one method at one N, in this process."""
    if method in ("torch", "triton"):
        from minirl.kernels import fused_logprobs

        os.environ["MINIRL_LOGPROBS"] = method
        fused_logprobs.WORKSPACE = 2**23 // scale**2
    small = make_inputs(min(N, 8), D, V, dtype, device, seed=1)
    step(method, *small, tau)  # warm-up: lazy initialisations and kernel compilation stay out of the peak
    del small
    inputs = make_inputs(N, D, V, dtype, device)
    sync(device)
    inputs[1].requires_grad_(False)  # memory as the RL losses see it: lm_head frozen
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(method, *inputs, tau)
        sync(device)
        extra = torch.cuda.max_memory_allocated() - base
    else:
        base = proc_status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM ← VmRSS
        step(method, *inputs, tau)
        extra = proc_status("VmHWM") - base
    inputs[1].requires_grad_(True)
    return {"fwd_s": timed(method, inputs, tau, False, repeats, device),
            "fwdbwd_s": timed(method, inputs, tau, True, repeats, device), "extra_bytes": extra}


def measure_in_fresh_process(args, method, N, D, V, scale):
    cmd = [sys.executable, __file__, "--worker", method, str(N), str(D), str(V), "--scale", str(scale),
           "--dtype", args.dtype, "--threads", str(args.threads), "--repeats", str(args.repeats),
           "--temperature", str(args.temperature)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"worker {method} N={N} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--scale", type=int, default=1, help="divide D, V and every N by this (CPU: try 8)")
    ap.add_argument("--small", action="store_true", help="same as --scale 8")
    ap.add_argument("--rows", type=int, nargs="+", default=list(ROWS), help="values of N before scaling")
    ap.add_argument("--methods", nargs="+", default=None, help="default: naive torch matmul, plus triton on CUDA")
    ap.add_argument("--temperature", type=float, default=0.3)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--worker", nargs=4, metavar=("METHOD", "N", "D", "V"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]

    if args.worker:
        method, N, D, V = args.worker[0], *map(int, args.worker[1:])
        result = measure(method, N, D, V, dtype, torch.device("cpu"), args.temperature, args.repeats, args.scale)
        print(json.dumps(result))
        return

    device = torch.device(args.device)
    scale = 8 if args.small else args.scale
    D, V = D_FULL // scale, V_FULL // scale
    methods = args.methods or ["naive", "torch"] + (["triton"] if device.type == "cuda" else []) + ["matmul"]
    if device.type != "cuda" and "triton" in methods:
        raise SystemExit("--methods triton needs --device cuda (the interpreter is for tests, not timings)")
    print(f"device {device}, {args.dtype}, D = {D}, V = {V} (scale 1/{scale}), τ = {args.temperature}, "
          f"{args.threads} thread(s), median of {args.repeats}")
    print("aims: fwd+bwd ≤ 1.5 × three plain products; extra memory ≤ 5 % of the naive reference's")
    print(f"{'N':>6}  {'method':<7} {'fwd ms':>9} {'/1 mm':>6} {'fwd+bwd ms':>11} {'/3 mm':>6} "
          f"{'extra MiB':>10} {'/naive':>7}")
    for rows in args.rows:
        N = max(1, rows // scale)
        results = {}
        for method in methods:
            if device.type == "cuda":
                results[method] = measure(method, N, D, V, dtype, device, args.temperature, args.repeats, scale)
                torch.cuda.empty_cache()
            else:
                results[method] = measure_in_fresh_process(args, method, N, D, V, scale)
        mm, ref = results.get("matmul"), results.get("naive")
        for method, r in results.items():
            fwd_ratio = f"{r['fwd_s'] / mm['fwd_s']:6.2f}" if mm else "     -"
            all_ratio = f"{r['fwdbwd_s'] / mm['fwdbwd_s']:6.2f}" if mm else "     -"
            mem_ratio = f"{r['extra_bytes'] / ref['extra_bytes']:7.1%}" if ref and method != "matmul" else "      -"
            print(f"{N:>6}  {method:<7} {r['fwd_s'] * 1e3:9.1f} {fwd_ratio} {r['fwdbwd_s'] * 1e3:11.1f} {all_ratio} "
                  f"{r['extra_bytes'] / 2**20:10.1f} {mem_ratio}")


if __name__ == "__main__":
    main()

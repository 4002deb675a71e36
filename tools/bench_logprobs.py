"""Time and peak memory of gathered log-probs: the naive reference, the PyTorch path, the Triton kernel.

Every method computes logp = log_softmax(H Wᵀ / τ)[i, t_i] for N rows and backpropagates Σ u_i·logp_i,
at Qwen2-1.5B's shape (D = 1536, V = 151,936) for N from 512 to 16,384:

    naive    H Wᵀ, log_softmax, gather, autograd: several N×V tensors
    torch    minirl.kernels.gathered_logprobs on its PyTorch path (the path CPUs take)
    triton   minirl.kernels.gathered_logprobs on CUDA (the fused kernels)
    matmul   the plain products it cannot beat: logits = H Wᵀ (forward), dH = G W, dW = Gᵀ H (backward)

Printed per (N, method), three timings, each with its ratio to the plain products that do the same work:
- fwd: the forward alone, against one product (H Wᵀ);
- frozen: forward + backward to H with W frozen (LoRA leaves lm_head alone), against two products
  (H Wᵀ and G W); aim ≤ 1.15: the fused path accumulates dH in the forward and never recomputes;
- trainable: forward + backward to H and W, against three products; the fused path recomputes the
  logits in the backward, so four products are its floor (1.33).
Then the extra memory of a frozen-W step and its ratio to the naive reference's (aim: ≤ 5 %): the peak
above what the inputs already hold (dH included). On CUDA torch.cuda.max_memory_allocated; on the CPU
the peak resident set (VmHWM) of a fresh process per measurement, above its resident set once the
inputs exist and one small warm-up run is done, with glibc told to map large blocks separately so
that freed tensors leave the resident set.

Times are the fastest of --repeats runs, all methods and modes interleaved in one process (the least
disturbed run of each: these machines are shared). On the CPU with one thread they are the process's
CPU time (user + system, page faults included), which a busy machine inflates less than wall time;
with more threads, and on CUDA (synchronised), wall time.
With --scale s, D, V and N shrink by s, and so does the fused path's workspace (by s², as N·C), so
that every ratio is close to the one the full shape would give. Not the per-op overhead: a chunk's
arithmetic shrinks by s³ while the cost of launching its dozen ops does not, so at --small the fused
path's ratios overstate what the full shape pays.

    python tools/bench_logprobs.py --small                      # CPU: every size ÷ 8, one thread
    python tools/bench_logprobs.py --device cuda --dtype bf16   # the full shape on a GPU
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from _measure import MALLOC_ENV, proc_bytes, reset_peak

ROWS = (512, 1024, 2048, 4096, 8192, 16384)
D_FULL, V_FULL = 1536, 151936
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TIMINGS = (("fwd_s", 1), ("frozen_s", 2), ("trainable_s", 3))  # (key, plain products of the same work)


def naive(h, w, t, tau):
    logits = (h @ w.T).float() / tau  # (N, V)
    return torch.log_softmax(logits, dim=-1).gather(1, t[:, None])[:, 0]


def fused(method, device):
    from minirl.kernels import gathered_logprobs

    # On the CPU the automatic choice is the PyTorch path (workers run with TRITON_INTERPRET=0).
    kwargs = {} if device.type == "cpu" else {"use_triton": method == "triton"}
    return lambda h, w, t, tau: gathered_logprobs(h, w, t, tau, **kwargs)


def make_inputs(N, D, V, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).to(dtype=dtype, device=device).requires_grad_(True)
    w = (torch.randn(V, D, generator=g) / D**0.5).to(dtype=dtype, device=device)
    t = torch.randint(0, V, (N,), generator=g).to(device)
    u = torch.randn(N, generator=g).to(device)
    return h, w, t, u


def step(method, fn, h, w, t, u, tau, mode):
    """One forward ("fwd"), or forward + backward with W "frozen" or "trainable"; gradients in h.grad, w.grad."""
    w.requires_grad_(mode == "trainable")
    h.grad = w.grad = None
    if method == "matmul":
        with torch.no_grad():
            logits = h @ w.T  # (N, V)
            if mode != "fwd":
                G = logits  # any N×V operand will do: the cost is the products
                h.grad = G @ w  # (N, D)
                if mode == "trainable":
                    w.grad = G.T @ h  # (V, D)
            del logits
        return
    if mode == "fwd":
        with torch.no_grad():
            fn(h, w, t, tau)
        return
    (fn(h, w, t, tau) * u).sum().backward()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def clock(device, threads):
    return time.process_time if device.type == "cpu" and threads == 1 else time.perf_counter


def method_fn(method, device, scale):
    """What `step` calls for `method` (None for matmul); the fused path's workspace scaled as its shape."""
    if method in ("torch", "triton"):
        from minirl.kernels import fused_logprobs

        fused_logprobs.WORKSPACE = 2**23 // scale**2
        return fused(method, device)
    return naive if method == "naive" else None


def warm_up(method, fn, D, V, dtype, device, tau):
    """Lazy initialisations and kernel compilation stay out of the figures."""
    small = make_inputs(8, D, V, dtype, device, seed=1)
    for mode in ("fwd", "frozen", "trainable"):
        step(method, fn, *small, tau, mode)


def measure_times(methods, N, D, V, dtype, device, tau, repeats, scale, threads):
    """{method: {fwd_s, frozen_s, trainable_s}}: the fastest of `repeats` runs, every method and mode
    interleaved, so that a burst of load from elsewhere hits them alike and the least disturbed run counts."""
    now = clock(device, threads)
    fns = {method: method_fn(method, device, scale) for method in methods}
    for method, fn in fns.items():
        warm_up(method, fn, D, V, dtype, device, tau)
    inputs = make_inputs(N, D, V, dtype, device)
    times = {method: {key: [] for key, _ in TIMINGS} for method in methods}
    for _ in range(repeats):
        for method, fn in fns.items():
            for key, _ in TIMINGS:
                sync(device)
                start = now()
                step(method, fn, *inputs, tau, key[:-2])
                sync(device)
                times[method][key].append(now() - start)
    return {method: {key: min(v) for key, v in t.items()} for method, t in times.items()}


def measure_memory(method, N, D, V, dtype, device, tau, scale):
    """Extra bytes of one frozen-W step of `method` above its inputs, in this process."""
    fn = method_fn(method, device, scale)
    warm_up(method, fn, D, V, dtype, device, tau)
    inputs = make_inputs(N, D, V, dtype, device)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(method, fn, *inputs, tau, "frozen")
        sync(device)
        return torch.cuda.max_memory_allocated() - base
    base = proc_bytes("VmRSS")
    reset_peak()
    step(method, fn, *inputs, tau, "frozen")
    return proc_bytes("VmHWM") - base


def in_fresh_process(args, worker, N, D, V, scale):
    cmd = [sys.executable, __file__, "--worker", worker, str(N), str(D), str(V), "--scale", str(scale),
           "--dtype", args.dtype, "--threads", str(args.threads), "--repeats", str(args.repeats),
           "--temperature", str(args.temperature), "--methods", *args.methods]
    env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": str(args.threads),
           "TRITON_INTERPRET": "0"}  # the interpreter is for tests, not timings
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"worker {worker} N={N} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def ratios(results):
    """Each method's times over the plain products' and its memory over the naive reference's."""
    mm, ref = results.get("matmul"), results.get("naive")
    out = {}
    for method, r in results.items():
        out[method] = {key: r[key] / mm[key] for key, _ in TIMINGS} if mm else {}
        if ref and method != "matmul":
            out[method]["extra_bytes"] = r["extra_bytes"] / ref["extra_bytes"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--scale", type=int, default=1, help="divide D, V and every N by this (CPU: try 8)")
    ap.add_argument("--small", action="store_true", help="same as --scale 8")
    ap.add_argument("--rows", type=int, nargs="+", default=list(ROWS), help="values of N before scaling")
    ap.add_argument("--methods", nargs="+", default=None, help="default: naive torch matmul, plus triton on CUDA")
    ap.add_argument("--temperature", type=float, default=0.3)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (the fastest counts)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--json", metavar="FILE", help="also write every figure and ratio to FILE")
    ap.add_argument("--worker", nargs=4, metavar=("WHAT", "N", "D", "V"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]

    if args.worker:  # "times", or the one method whose memory to measure
        worker, N, D, V = args.worker[0], *map(int, args.worker[1:])
        cpu = torch.device("cpu")
        if worker == "times":
            result = measure_times(args.methods, N, D, V, dtype, cpu, args.temperature, args.repeats, args.scale,
                                   args.threads)
        else:
            result = measure_memory(worker, N, D, V, dtype, cpu, args.temperature, args.scale)
        print(json.dumps(result))
        return

    device = torch.device(args.device)
    scale = 8 if args.small else args.scale
    D, V = D_FULL // scale, V_FULL // scale
    methods = args.methods = args.methods or ["naive", "torch"] + (["triton"] if device.type == "cuda" else []) + ["matmul"]
    if device.type != "cuda" and "triton" in methods:
        raise SystemExit("--methods triton needs --device cuda (the interpreter is for tests, not timings)")
    timer = "CPU time" if device.type == "cpu" and args.threads == 1 else "wall time"
    print(f"device {device}, {args.dtype}, D = {D}, V = {V} (scale 1/{scale}), τ = {args.temperature}, "
          f"{args.threads} thread(s), fastest of {args.repeats} ({timer})")
    print("aims: frozen fwd+bwd ≤ 1.15 × two plain products; extra memory ≤ 5 % of the naive reference's")
    print(f"{'N':>6}  {'method':<7} {'fwd ms':>8} {'/1 mm':>6} {'frozen ms':>10} {'/2 mm':>6} "
          f"{'trainable ms':>13} {'/3 mm':>6} {'extra MiB':>10} {'/naive':>7}")
    report = {"device": str(device), "dtype": args.dtype, "D": D, "V": V, "scale": scale,
              "temperature": args.temperature, "threads": args.threads, "timer": timer, "rows": []}
    for rows in args.rows:
        N = max(1, rows // scale)
        if device.type == "cuda":
            times = measure_times(methods, N, D, V, dtype, device, args.temperature, args.repeats, scale,
                                  args.threads)
            memory = {}
            for method in methods:
                torch.cuda.empty_cache()
                memory[method] = measure_memory(method, N, D, V, dtype, device, args.temperature, scale)
        else:  # memory: a fresh process per method, so that no other method's pages are in its resident set
            times = in_fresh_process(args, "times", N, D, V, scale)
            memory = {method: in_fresh_process(args, method, N, D, V, scale) for method in methods}
        results = {method: {**times[method], "extra_bytes": memory[method]} for method in methods}
        rel = ratios(results)
        report["rows"].append({"N": N, "results": results, "ratios": rel})
        for method, r in results.items():
            cells = [f"{r[key] * 1e3:{w}.1f} " + (f"{rel[method][key]:6.2f}" if rel[method] else "     -")
                     for (key, _), w in zip(TIMINGS, (8, 10, 13))]
            mem = f"{rel[method]['extra_bytes']:7.1%}" if "extra_bytes" in rel[method] else "      -"
            print(f"{N:>6}  {method:<7} {' '.join(cells)} {r['extra_bytes'] / 2**20:10.1f} {mem}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

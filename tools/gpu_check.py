"""Everything a GPU machine should confirm, in one run of at most 8 minutes, written to one JSON report.

Four parts, each in its own process (so that one part's memory and compiled kernels do not leak into
another's figures), with a time limit each and one deadline for all:

    kernels          the compiled Triton kernels and the PyTorch path of gathered_logprobs against the
                     fp32 reference (materialised log_softmax + gather, autograd, in row chunks) at
                     D = 1,536, V = 151,936, N from 512 to 16,384, fp32 and bf16, lm_head frozen
                     (dh) and trainable (dh, dW): max errors, and whether each is within tolerance;
    bench_logprobs   tools/bench_logprobs.py at that shape in bf16: times against plain products, and
                     extra memory against the naive reference;
    tspmo_step       one T-SPMO step (G = 50, 300 new tokens, LoRA as the paper) of a random
                     Qwen2-1.5B-shaped model, as minirl.plan models it (every row of its worst case),
                     its measured peak CUDA memory per phase beside minirl.plan's prediction;
    bench_generate   tools/bench_generate.py at the Qwen2-1.5B shape in bf16, minirl against transformers.

It fails loudly rather than report garbage: a part whose process fails, runs out of time, or returns a
figure that is missing, not finite or not positive is marked failed with its reason and the tail of its
output; kernel errors past their tolerance fail the kernels part. The report is written in every case,
and the exit status is 0 only if every part passed. The benchmarks' figures are findings, not checks:
their ratios are reported, not judged.

--cpu-smoke runs every part at tiny shapes on the CPU (the kernels under TRITON_INTERPRET=1), so that
the script itself can be tested end to end where there is no GPU; its figures mean nothing.

    bash tools/gpu_check.sh                   # on a GPU machine: gpu_check.json
    bash tools/gpu_check.sh --cpu-smoke --out /tmp/smoke.json
"""

import argparse
import gc
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.perf_counter()
TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
PARTS = ("kernels", "bench_logprobs", "tspmo_step", "bench_generate")  # in order of importance
LIMITS = {"kernels": 150, "bench_logprobs": 120, "tspmo_step": 120, "bench_generate": 200}  # seconds, on a GPU
BUDGET = 470  # seconds for every part together: under 8 minutes with the start-up
D_FULL, V_FULL, ROWS = 1536, 151936, (512, 1024, 2048, 4096, 8192, 16384)
SMOKE_KERNELS = (64, 1000, (16, 40))  # D, V, N of the kernel part under --cpu-smoke
HALF_FACTOR = 4  # bf16 gradients within 4 eps of fp32, as tests/test_kernels.py asks on the CPU
QWEN2_1_5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True)


class CheckFailed(Exception):
    """A figure that cannot be trusted, or a check that did not pass: the part fails with this message."""


def finite_positive(name, x, zero_too=False):
    if not (isinstance(x, (int, float)) and math.isfinite(x) and (x > 0 or zero_too and x == 0)):
        raise CheckFailed(f"{name} = {x!r}: expected a finite number {'≥' if zero_too else '>'} 0")
    return x


# ----------------------------------------------------------------------------- kernels


def reference(h, w, t, tau, u, rows=2048):
    """fp32 logp, dh, dW of Σ u·logp through log_softmax of every logit, `rows` rows at a time."""
    import torch

    w = w.detach().float().requires_grad_(True)  # detach: .float() of an fp32 tensor is that tensor
    logp, dh = [], []
    for a in range(0, len(t), rows):
        hc = h[a:a + rows].detach().float().requires_grad_(True)
        lp = torch.log_softmax(hc @ w.T / tau, dim=-1).gather(1, t[a:a + rows, None])[:, 0]  # (n,)
        (lp * u[a:a + rows]).sum().backward()
        logp.append(lp.detach())
        dh.append(hc.grad)
    return torch.cat(logp), torch.cat(dh), w.grad


def max_error(name, got, ref, tol=None):
    """{name}_err: max |got − ref| (over max |ref| when tol is given); raises when got − ref is not finite,
    or when some entry is past tol·(|ref| + max |ref|)."""
    import torch

    diff = (got.float() - ref).abs()
    if not bool(torch.isfinite(diff).all()):
        raise CheckFailed(f"{name}: not finite")
    if tol is None:
        return float(diff.max())
    scale = float(ref.abs().max())
    if bool((diff > tol * (ref.abs() + scale)).any()):
        raise CheckFailed(f"{name}: max error {float(diff.max()) / scale:.3g} × max|ref|, past the tolerance {tol:.3g}")
    return float(diff.max()) / scale


def part_kernels(smoke: bool, device: str) -> dict:
    import torch

    from minirl.kernels import fused_logprobs, gathered_logprobs

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means IEEE fp32 here, in the kernels and the reference
    D, V, rows = SMOKE_KERNELS if smoke else (D_FULL, V_FULL, ROWS)
    tau = 0.3
    out = {"D": D, "V": V, "temperature": tau, "backend": fused_logprobs.backend(torch.device(device)), "cases": []}
    if out["backend"] != "triton":
        raise CheckFailed(f"gathered_logprobs would take the {out['backend']} path on {device}, not Triton")
    failures = []
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        grad_tol = 1e-4 if dtype == torch.float32 else HALF_FACTOR * torch.finfo(dtype).eps
        for N in rows:
            g = torch.Generator().manual_seed(N)
            h = torch.randn(N, D, generator=g).to(device, dtype)
            # A direction every row of W shares, as real lm_heads have: dh is then a difference of large terms.
            w = ((torch.randn(V, D, generator=g) + torch.randn(D, generator=g)) / D**0.5).to(device, dtype)
            t = torch.randint(0, V, (N,), generator=g).to(device)
            u = (torch.randn(N, generator=g) / (8 * 300)).to(device)  # a mean over 8 completions of 300 tokens
            ref_logp, ref_dh, ref_dw = reference(h, w, t, tau, u)
            for path in ("triton", "torch"):
                for frozen in (True, False):
                    case = {"dtype": dtype_name, "N": N, "path": path, "weight": "frozen" if frozen else "trainable"}
                    try:
                        hh = h.clone().requires_grad_(True)
                        ww = w.clone().requires_grad_(not frozen)
                        logp = gathered_logprobs(hh, ww, t, tau, use_triton=path == "triton")
                        (logp * u).sum().backward()
                        case["logp_abs_err"] = max_error("logp", logp.detach(), ref_logp)
                        if case["logp_abs_err"] > 1e-3:
                            raise CheckFailed(f"logp: max error {case['logp_abs_err']:.3g}, past 1e-3")
                        case["dh_rel_err"] = max_error("dh", hh.grad, ref_dh, grad_tol)
                        if not frozen:
                            case["dw_rel_err"] = max_error("dW", ww.grad, ref_dw, grad_tol)
                        case["ok"] = True
                    except Exception as e:  # a compile error or an OOM fails this case, not the others
                        case["ok"], case["error"] = False, str(e) if isinstance(e, CheckFailed) else repr(e)[:500]
                        failures.append(f"{dtype_name} N={N} {path} {case['weight']}: {case['error']}")
                    out["cases"].append(case)
                    hh = ww = logp = None
            del h, w, ref_dh, ref_dw
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    out["tolerance"] = {"logp_abs": 1e-3, "grad_rel_fp32": 1e-4, "grad_rel_bf16": HALF_FACTOR * 2.0**-7}
    if failures:
        raise CheckFailed("; ".join(failures[:5]) + (f"; and {len(failures) - 5} more" if len(failures) > 5 else ""),
                          out)
    return out


# ----------------------------------------------------------------------------- benchmarks (subprocesses)


def run_tool(cmd, timeout) -> str:
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise CheckFailed(f"{' '.join(map(str, cmd[1:3]))} exited {done.returncode}: {done.stderr[-1500:]}")
    return done.stdout


def part_bench_logprobs(smoke: bool, device: str, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "bench.json"
        args = (["--scale", "32", "--rows", "512", "2048", "--repeats", "1"] if smoke
                else ["--device", device, "--dtype", "bf16"])
        text = run_tool([sys.executable, str(TOOLS / "bench_logprobs.py"), *args, "--json", str(result)], timeout)
        report = json.loads(result.read_text())
    fused = "torch" if smoke else "triton"
    for row in report["rows"]:  # at the smoke run's sizes the resident set may not move at all: 0 is allowed
        for method, r in row["results"].items():
            for key in ("fwd_s", "frozen_s", "trainable_s", "extra_bytes"):
                finite_positive(f"N={row['N']} {method} {key}", r[key], zero_too=smoke and key == "extra_bytes")
        for key in ("fwd_s", "frozen_s", "trainable_s", "extra_bytes"):
            finite_positive(f"N={row['N']} {fused} {key} ratio", row["ratios"][fused][key],
                            zero_too=smoke and key == "extra_bytes")
    report["table"] = text.splitlines()
    return report


def part_bench_generate(smoke: bool, device: str, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        args = (["--shape", "small", "--batch", "2", "--new-tokens", "4", "--rounds", "1", "--device", "cpu"] if smoke
                else ["--shape", "qwen2-1.5b", "--batch", "8", "--new-tokens", "64", "--rounds", "2",
                      "--device", device])
        cmd = [sys.executable, str(TOOLS / "bench_generate.py"), *args, "--dtype", "bf16", "--temperature", "1",
               "--folder", tmp]
        text = run_tool(cmd, timeout)
    return {"command": " ".join(cmd[1:-2]), "output": text.splitlines(), **parse_generate(text)}


def parse_generate(text: str) -> dict:
    """The figures bench_generate prints; CheckFailed if one is missing or not a positive number."""
    out = {}
    patterns = {"minirl_tokens_per_s": r"minirl\.generate\s+([\d.]+) tokens/s",
                "minirl_first_call_s": r"minirl\.generate\s+[\d.]+ tokens/s\s+first call ([\d.]+) s",
                "transformers_tokens_per_s": r"transformers\.generate\s+([\d.]+) tokens/s",
                "ratio": r"ratio minirl / transformers: ([\d.]+)x"}
    for key, pattern in patterns.items():
        found = re.search(pattern, text)
        if not found:
            raise CheckFailed(f"bench_generate printed no {key} (/{pattern}/): its output format changed?")
        out[key] = finite_positive(key, float(found.group(1)))
    return out


# ----------------------------------------------------------------------------- one T-SPMO step


def memory_probe(device: str):
    """(reset, peak): the peak of allocated bytes since the last reset (CUDA), or of the resident set (CPU)."""
    import torch

    if device.startswith("cuda"):
        def reset():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

        def peak():
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return reset, peak, torch.cuda.memory_allocated
    from _measure import proc_bytes, reset_peak

    return reset_peak, lambda: proc_bytes("VmHWM"), lambda: proc_bytes("VmRSS")


def part_tspmo_step(smoke: bool, device: str) -> dict:
    import torch

    from measure_peak import attention_kernel, pick_rows
    from minirl.config import build_parser as train_parser
    from minirl.config import config_from_args
    from minirl.generate import generate
    from minirl.kernels.fused_logprobs import backend
    from minirl.logprobs import selected_logprobs
    from minirl.lora import add_lora, lora_parameters
    from minirl.model import Decoder, init_weights
    from minirl.model_config import ModelConfig
    from minirl.plan import add_plan_arguments, plan_memory, rows_per_forward, sequences_per_forward

    G, new, prompt = (4, 8, 6) if smoke else (50, 300, 60)
    flags = ["--method", "tspmo", "--group-size", str(G), "--max-new-tokens", str(new), "--device", device,
             "--dtype", "fp32"]
    ap = train_parser()
    add_plan_arguments(ap)
    args = ap.parse_args(flags + ["--prompt-tokens", str(prompt)])
    cfg = config_from_args(args, {})  # a model folder without tuned settings: the paper's
    config = ModelConfig(**(TINY if smoke else QWEN2_1_5B), max_position_embeddings=4096)
    plan = plan_memory(config, cfg, prompt, "auto")
    reset, peak, allocated = memory_probe(device)

    gc.collect()
    baseline = allocated()
    with torch.device(device):  # built where it runs: no fp32 copy of 1.5 B weights on the host
        model = init_weights(Decoder(config), generator=torch.Generator(device).manual_seed(0)).eval()
    add_lora(model, targets=cfg.lora_targets, layers=cfg.lora_layers, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
             generator=torch.Generator().manual_seed(0))
    params = lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    for p in params:  # both moments exist, as from the second step on
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    built = allocated() - baseline
    generator = torch.Generator(device).manual_seed(0)

    def step():
        """Generation, then the update's forwards and backwards as the plan counts them, then AdamW."""
        root = torch.randint(0, config.vocab_size, (prompt,), generator=torch.Generator().manual_seed(1)).tolist()
        gc.collect()
        reset()
        chunk = min(cfg.gen_batch or G, G)
        completions = []
        for a in range(0, G, chunk):
            completions += generate(model, [root] * min(chunk, G - a), new, temperature=1.0, eos_token_id=None,
                                    generator=generator)
        peaks = {"generation": peak() - baseline}
        gc.collect()
        reset()
        B = sequences_per_forward(cfg)
        for a in range(0, G, B):
            part = completions[a:a + B]
            picks = pick_rows(rows_per_forward(cfg, len(part)), len(root), part)
            logp = selected_logprobs(model, [root + c for c in part], picks, cfg.temperature)  # (N,)
            advantages = torch.randn(len(picks), generator=generator, device=device)
            (-(torch.exp(logp) * advantages).sum()).backward()
            del logp
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        peaks["update"] = peak() - baseline
        return peaks

    started = time.perf_counter()
    with attention_kernel(config, cfg, "auto"):
        cold = step()
        residue = allocated() - baseline - built  # what the first step keeps: library workspaces, compiled graphs
        warm = step()  # the figures, measured from the same baseline: the residue is in them
    predicted = {"generation": plan.generation.total, "update": plan.update.total, "peak": plan.peak}
    measured = {**warm, "peak": max(warm.values())}
    out = {"plan_command": None if smoke else "python -m minirl.plan --shape qwen2-1.5b " + " ".join(flags),
           "model": {**(TINY if smoke else QWEN2_1_5B)}, "group_size": G, "max_new_tokens": new,
           "prompt_tokens": prompt, "logprob_path": backend(torch.device(device)), "built_bytes": built,
           "first_step_residue_bytes": residue, "cold": cold, "measured": measured, "predicted": predicted,
           "seconds_for_two_steps": time.perf_counter() - started}
    for key in ("generation", "update", "peak"):
        finite_positive(f"measured {key}", measured[key])
        out[f"predicted_over_measured_{key}"] = finite_positive(f"predicted {key}", predicted[key]) / measured[key]
    return out


# ----------------------------------------------------------------------------- orchestration


def environment(device: str) -> dict:
    import importlib.metadata

    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    try:
        info["triton"] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        info["triton"] = None
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return info


def run_part(name: str, smoke: bool, device: str, timeout: float) -> dict:
    """One part in a fresh process: its JSON, or {"ok": False, "error": …}."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TOOLS), os.environ.get("PYTHONPATH", "")])}
    env.pop("TRITON_INTERPRET", None)  # compiled kernels on a GPU; interpreted only in the smoke run's kernel part
    if smoke:
        env.update(OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
        if name == "kernels":
            env["TRITON_INTERPRET"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "part.json"
        cmd = [sys.executable, __file__, "--part", name, "--device", device, "--part-out", str(result),
               "--part-timeout", str(int(timeout))] + (["--cpu-smoke"] if smoke else [])
        started = time.perf_counter()
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout + 5)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"timed out after {timeout:.0f} s", "seconds": time.perf_counter() - started}
        out = json.loads(result.read_text()) if result.exists() else {}
    out.setdefault("ok", False)
    out["seconds"] = time.perf_counter() - started
    if not out["ok"]:
        out.setdefault("error", f"exited {done.returncode} without a result")
        out["output_tail"] = (done.stdout + done.stderr)[-3000:]
    return out


def part_main(args):
    """--part NAME: run one part, write {"ok": True, **figures} or {"ok": False, "error": …} to --part-out."""
    smoke, device = args.cpu_smoke, args.device
    try:
        if args.part == "kernels":
            out = part_kernels(smoke, device)
        elif args.part == "bench_logprobs":  # the tool's own limit: what is left after this process's start
            out = part_bench_logprobs(smoke, device, args.part_timeout - (time.perf_counter() - STARTED))
        elif args.part == "bench_generate":
            out = part_bench_generate(smoke, device, args.part_timeout - (time.perf_counter() - STARTED))
        else:
            out = part_tspmo_step(smoke, device)
        out = {"ok": True, **out}
    except CheckFailed as e:
        out = {"ok": False, "error": str(e.args[0]), **(e.args[1] if len(e.args) > 1 else {})}
    except subprocess.TimeoutExpired as e:
        out = {"ok": False, "error": f"{e.cmd[1]} timed out after {e.timeout:.0f} s"}
    Path(args.part_out).write_text(json.dumps(out, indent=1))
    return 0 if out["ok"] else 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check.json", help="the report (default: gpu_check.json)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: tests the script, not a GPU")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list, default {','.join(PARTS)}")
    ap.add_argument("--device", default=None, help="default: cuda, or cpu with --cpu-smoke")
    ap.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    ap.add_argument("--part-out", help=argparse.SUPPRESS)
    ap.add_argument("--part-timeout", type=float, default=600, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.device = args.device or ("cpu" if args.cpu_smoke else "cuda")
    if args.part:
        return part_main(args)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"--parts: unknown {', '.join(unknown)}; expected some of {', '.join(PARTS)}")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("no CUDA device here: run it on a GPU machine, or with --cpu-smoke to test the script")
    report = {"cpu_smoke": args.cpu_smoke, "device": args.device, "environment": environment(args.device),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "parts": {}}
    deadline = time.perf_counter() + BUDGET
    for name in parts:
        left = deadline - time.perf_counter()
        if left < 20:
            report["parts"][name] = {"ok": False, "error": f"not run: {BUDGET} s budget spent"}
            continue
        print(f"gpu_check: {name} (up to {min(LIMITS[name], left):.0f} s)", file=sys.stderr, flush=True)
        report["parts"][name] = run_part(name, args.cpu_smoke, args.device, min(LIMITS[name], left))
        status = "ok" if report["parts"][name]["ok"] else "FAILED: " + report["parts"][name]["error"][:300]
        print(f"gpu_check: {name} {status} ({report['parts'][name]['seconds']:.0f} s)", file=sys.stderr, flush=True)
    report["failures"] = [f"{n}: {p['error']}" for n, p in report["parts"].items() if not p["ok"]]
    report["ok"] = not report["failures"]
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"gpu_check: {'all parts passed' if report['ok'] else 'FAILED'}; report in {args.out}", file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

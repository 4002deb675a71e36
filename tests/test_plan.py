"""minirl.plan against what PyTorch actually allocates and keeps.

- per-token kept activations against torch.autograd.graph.saved_tensors_hooks, exactly;
- weights, LoRA, KV cache terms against the tensors themselves (and transformers' own parameter count);
- the whole plan against the peak resident memory of a real step, measured by tools/measure_peak.py in
  a subprocess, within 15 %, both the phase totals and what the phase adds above the model;
- the command line: its figures, the largest group under a budget (against a linear search), bad input;
- the planner resolves its flags into the very settings training runs with, for every method and model.
"""

import collections
import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import minirl.train
from conftest import random_model
from minirl.config import METHODS, TrainConfig, config_from_args
from minirl.config import build_parser as train_parser
from minirl.errors import InputError
from minirl.generate import onednn_available
from minirl.lora import TARGETS, add_lora, lora_parameters
from minirl.model import Decoder
from minirl.model_config import ModelConfig
from minirl.plan import (SHAPES, adapter_bytes_per_token, build_parser, gib, largest_group, lora_parameter_count, main,
                         onednn_entries, parameter_count, parse_size, plan_memory, run_config, saved_bytes_per_token)
from minirl.tiny import tiny_model_path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "measure_peak.py"
DTYPES = {"fp32": (torch.float32, 4), "bf16": (torch.bfloat16, 2)}


def saved_bytes_by_layer(model, ids, attention: str) -> collections.Counter:
    """Bytes autograd saves in a forward, by decoder layer index, "final" (the last norm) and "rope"
    (cos and sin, (B, 1, T, Dh), shared by every layer); each storage counted once, parameters never."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    where, seen, out = [None], set(), collections.Counter()
    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: where.__setitem__(0, i))
             for i, layer in enumerate(model.model.layers)]
    hooks.append(model.model.norm.register_forward_pre_hook(lambda m, a: where.__setitem__(0, "final")))

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            out["rope" if t.dim() == 4 and t.shape[1] == 1 else where[0]] += storage.nbytes()
        return t

    backend = SDPBackend.MATH if attention == "math" else SDPBackend.FLASH_ATTENTION
    try:
        with sdpa_kernel(backend), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.hidden_states(ids)
    finally:
        for h in hooks:
            h.remove()
    return out


@pytest.mark.parametrize("attention", ["fused", "math"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), TARGETS, ("k_proj",), ("o_proj",), ("gate_proj",),
                                     ("down_proj",)])
def test_kept_activations_per_token_are_what_autograd_saves(targets, dtype, attention):
    torch_dtype, s = DTYPES[dtype]
    model = random_model(0, num_hidden_layers=4).to(torch_dtype)
    add_lora(model, targets=targets, layers=[1, 2, 3], rank=4, alpha=8)
    B, T = 2, 24
    saved = saved_bytes_by_layer(model, torch.randint(0, 96, (B, T)), attention)
    c = model.config
    assert saved[0] == 0  # below the first adapted layer nothing is kept
    for i in (1, 2, 3):
        expected = saved_bytes_per_token(c, s, targets, grad_in=i > 1, attention=attention, T=T)
        assert saved[i] == B * T * (expected + adapter_bytes_per_token(targets, 4)), f"layer {i}"
    assert saved["final"] == B * T * (4 * c.hidden_size + 4)
    assert saved["rope"] == B * T * 2 * s * c.head_dim


@pytest.mark.parametrize("shape, family", [("qwen2-1.5b", {}), ("qwen2-7b", {}), ("qwen2-0.5b", dict(model_type="qwen3")),
                                           ("qwen2-0.5b", dict(model_type="llama", mlp_bias=True))])
def test_parameter_count_matches_transformers(shape, family):
    import transformers

    config = ModelConfig(**SHAPES[shape], **family)
    hf_class = getattr(transformers, {"qwen2": "Qwen2", "qwen3": "Qwen3", "llama": "Llama"}[config.model_type] + "ForCausalLM")
    with torch.device("meta"):
        hf = hf_class(hf_class.config_class(**config.to_hf_dict()))
        ours = Decoder(config)
    assert parameter_count(config) == sum(p.numel() for p in hf.parameters())
    assert parameter_count(config) == sum(p.numel() for p in ours.parameters())


@pytest.mark.parametrize("tied", [True, False])
def test_weight_lora_and_cache_terms_are_the_tensors_bytes(tied):
    model = random_model(0, num_hidden_layers=4, tie_word_embeddings=tied).to(torch.bfloat16)
    cfg = TrainConfig(dtype="bf16", group_size=3, max_new_tokens=7, lora_rank=4, lora_targets="q_proj,up_proj",
                      lora_layers="last-half")
    plan = plan_memory(model.config, cfg, prompt_tokens=5)
    unique = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    assert plan.generation.held["weights"] == sum(unique.values())
    cache = model.new_cache(3, 5 + 7)
    assert plan.generation.held["KV cache"] == sum(k.nbytes + v.nbytes for k, v in cache)
    add_lora(model, targets=("q_proj", "up_proj"), layers=[2, 3], rank=4, alpha=8)
    n = sum(p.numel() for p in lora_parameters(model))
    assert lora_parameter_count(model.config, ("q_proj", "up_proj"), 2, 4) == n
    assert plan.generation.held["LoRA A, B and AdamW moments"] == 3 * 4 * n  # A, B and two moments, fp32
    assert plan.update.held["LoRA A, B, gradients and AdamW moments"] == 4 * 4 * n


# Reduced Qwen2 shapes, measured in a subprocess on the CPU (tools/measure_peak.py says how).
FAST_SHAPES = [
    # fp32, T-SPMO, the whole group in one forward, every layer adapted: kept activations dominate
    ["--group-size", "12", "--train-batch", "12", "--max-new-tokens", "64", "--layers", "4", "--lora-layers", "all",
     "--vocab", "8000"],
    # GRPO through rl/grpo.py, its default train_batch of completions per forward, with the KL reference
    ["--method", "grpo", "--group-size", "8", "--max-new-tokens", "48", "--layers", "4", "--vocab", "8000"],
    # bf16 with the math attention CUDA runs for fp32 + GQA, chunks of 8 sequences, the KV cache large
    ["--dtype", "bf16", "--hidden", "256", "--intermediate", "704", "--layers", "6", "--heads", "4", "--kv-heads", "4",
     "--vocab", "8000", "--max-new-tokens", "64", "--group-size", "16", "--train-batch", "8",
     "--lora-layers", "last:2", "--attention", "math"],
]
SLOW_SHAPES = [
    ["--dtype", "bf16"],
    ["--method", "grpo"],
    ["--method", "sgrpo", "--dtype", "bf16", "--vocab", "32000", "--max-new-tokens", "128"],
    ["--lora-targets", ",".join(TARGETS), "--lora-layers", "all", "--group-size", "8"],
    ["--dtype", "bf16", "--vocab", "4000", "--lora-targets", "gate_proj,up_proj", "--lora-layers", "last:2"],
    ["--attention", "math", "--group-size", "16", "--max-new-tokens", "128", "--kv-heads", "1", "--hidden", "512",
     "--intermediate", "1408", "--heads", "8", "--layers", "4"],
    ["--checkpoint-layers", "--layers", "8", "--lora-layers", "all"],
    ["--max-new-tokens", "64", "--train-batch", "4", "--gen-batch", "8"],
]


def measure(args) -> dict:
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(TOOL), "--json", *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def check_within_15_percent(result):
    predicted, measured = result["predicted"], result["measured"]
    for phase in ("generation", "update"):
        assert 0.85 <= predicted[phase] / measured[phase] <= 1.15, (phase, predicted, measured)
        # What the phase adds above the model itself: the terms that are not just the weights.
        added = (predicted[phase] - predicted["built"]) / (measured[phase] - measured["built"])
        assert 0.85 <= added <= 1.15, (phase, added, predicted, measured)


@pytest.mark.parametrize("args", FAST_SHAPES, ids=["fp32-tspmo", "fp32-grpo-batched", "bf16-math-chunks"])
def test_plan_is_within_15_percent_of_the_measured_peak(args):
    check_within_15_percent(measure(args))


@pytest.mark.slow
@pytest.mark.parametrize("args", SLOW_SHAPES, ids=lambda a: " ".join(a))
def test_plan_is_within_15_percent_of_the_measured_peak_sweep(args):
    check_within_15_percent(measure(args))


SMALL = ModelConfig(vocab_size=4096, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)


@pytest.mark.skipif(not onednn_available(torch.device("cpu")), reason="the reordered copy is made on an x86 CPU only")
def test_the_cpu_decode_copy_is_planned_up_to_its_limit():
    term = "weights in oneDNN's layout (x86 CPU decode)"
    for shape, dtype, expected in (("qwen2.5-0.5b", "fp32", True), ("qwen2.5-0.5b", "bf16", False),
                                   ("qwen2-1.5b", "fp32", False)):  # 5.7 GiB: past REORDER_MAX_BYTES
        config = ModelConfig(**SHAPES[shape])
        for device, planned in (("cpu", expected), ("cuda", False)):
            plan = plan_memory(config, TrainConfig(dtype=dtype, device=device))
            assert (term in plan.update.held) == planned, (shape, dtype, device)
            if planned:
                assert plan.generation.held[term] == plan.update.held[term] == 4 * onednn_entries(config)


@pytest.mark.parametrize("cfg", [TrainConfig(max_new_tokens=40), TrainConfig(method="grpo", gen_batch=0),
                                 TrainConfig(dtype="bf16", train_batch=4, max_new_tokens=40, device="cuda")])
def test_largest_group_is_what_a_linear_search_finds(cfg):
    peaks = [plan_memory(SMALL, replace(cfg, group_size=G)).peak for G in range(1, 121)]
    assert peaks == sorted(peaks)  # the search relies on the peak never falling as G grows
    budget = peaks[70] + 1  # G = 71 fits, and whichever larger G has the same peak
    expected = max(G for G, p in zip(range(1, 121), peaks) if p <= budget)
    assert largest_group(SMALL, cfg, budget) == expected
    assert largest_group(SMALL, cfg, peaks[0] - 1) == 0


@pytest.mark.parametrize("method", METHODS)
def test_every_method_plans_train_batch_completions_per_forward(method):
    """What a forward holds grows with min(train_batch, G) for every method, since rl/ batches all three."""
    def update(train_batch, G=16):
        cfg = TrainConfig(method=method, group_size=G, train_batch=train_batch, max_new_tokens=40)
        return plan_memory(SMALL, cfg).update

    one, four, all_of_them = update(1), update(4), update(64)
    for term in ("activations kept", "final norm, hidden states, RoPE tables"):
        assert four.held[term] == 4 * one.held[term] and all_of_them.held[term] == 16 * one.held[term]
    assert four.transient["backward of the top layer"] == 4 * one.transient["backward of the top layer"]
    if method != "tspmo":  # the KL reference runs over the same batch
        assert four.transient["reference forward (KL)"] == 4 * one.transient["reference forward (KL)"]


def test_command_line_prints_the_plan_and_the_largest_group(capsys):
    argv = ["--shape", "qwen2-1.5b", "--method", "tspmo", "--group-size", "50", "--max-new-tokens", "300",
            "--lora-rank", "8", "--lora-targets", "q_proj,v_proj", "--lora-layers", "last-quarter", "--dtype", "bf16",
            "--device", "cuda", "--train-batch", "8", "--budget", "10GB"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    cfg = TrainConfig(method="tspmo", group_size=50, max_new_tokens=300, lora_rank=8, lora_targets="q_proj,v_proj",
                      lora_layers="last-quarter", dtype="bf16", device="cuda", train_batch=8)
    config = ModelConfig(**SHAPES["qwen2-1.5b"])
    plan = plan_memory(config, cfg)
    assert f"peak: {gib(plan.peak).strip()}" in out
    for term, n in {**plan.update.held, **plan.generation.held}.items():
        assert f"{term}" in out and gib(n) in out
    assert f"G = {largest_group(config, cfg, 10**10)}\n" in out


def test_model_folder_reads_config_json(hf_folder, capsys):
    assert main(["--model", str(hf_folder), "--group-size", "4", "--max-new-tokens", "8", "--lora-layers", "all"]) == 0
    config = ModelConfig.from_json(hf_folder / "config.json")
    plan = plan_memory(config, TrainConfig(group_size=4, max_new_tokens=8, lora_layers="all"))
    assert f"peak: {gib(plan.peak).strip()}" in capsys.readouterr().out


class Started(Exception):
    """Raised in place of the training loop, once training has resolved its settings."""


def training_config(monkeypatch, argv) -> tuple[ModelConfig, TrainConfig]:
    """(model shape, settings) that `python -m minirl.train argv` would start its loop with."""
    def start(cfg, model, tokenizer, **kwargs):
        raise Started(model.config, cfg)

    monkeypatch.setattr(minirl.train, "train", start)
    with pytest.raises(Started) as started:
        minirl.train.main(argv)
    return started.value.args


@pytest.mark.parametrize("model", ["tiny (no --model)", "tiny (--model its folder)", "checkpoint"])
@pytest.mark.parametrize("method", METHODS)
def test_planner_resolves_the_settings_training_runs_with(method, model, hf_folder, tmp_path, monkeypatch):
    folder = {"tiny (no --model)": None, "tiny (--model its folder)": tiny_model_path(), "checkpoint": hf_folder}[model]
    argv = ["--method", method, "--out", str(tmp_path / "run")] + ([] if folder is None else ["--model", str(folder)])
    trained_shape, trained = training_config(monkeypatch, argv)
    planned_shape, planned = run_config(build_parser().parse_args(argv))
    assert asdict(planned) == asdict(trained)
    assert planned_shape == trained_shape
    if model == "tiny (--model its folder)":  # the folder's own tuned settings, as without --model
        _, without = training_config(monkeypatch, argv[:-2])
        assert asdict(trained) == {**asdict(without), "model": str(folder)}


def test_resume_plans_the_run_in_its_folder(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    cfg = TrainConfig(method="grpo", group_size=6, max_new_tokens=20, train_batch=3, out=str(run))
    (run / "config.json").write_text(json.dumps(asdict(cfg)))
    assert asdict(run_config(build_parser().parse_args(["--resume", str(run)]))[1]) == asdict(cfg)
    assert main(["--resume", str(run), "--lr", "1"]) == 2 and "--lr" in capsys.readouterr().err


def test_a_shape_plans_with_the_paper_defaults_of_a_checkpoint(hf_folder):
    for method in METHODS:
        shaped = run_config(build_parser().parse_args(["--shape", "qwen2-0.5b", "--method", method, "--out", "x"]))[1]
        folder = run_config(build_parser().parse_args(["--model", str(hf_folder), "--method", method, "--out", "x"]))[1]
        assert asdict(shaped) == {**asdict(folder), "model": None}
        assert asdict(shaped) == asdict(config_from_args(train_parser().parse_args(["--method", method, "--out", "x"]), {}))


@pytest.mark.parametrize("argv, names", [
    (["--shape", "qwen2-1.5b", "--group-size", "0"], "--group-size"),
    (["--shape", "qwen2-1.5b", "--lora-layers", "last-fifth"], "--lora-layers"),
    (["--shape", "qwen2-1.5b", "--lora-targets", "q_proj,w_proj"], "--lora-targets"),
    (["--shape", "qwen2-1.5b", "--budget", "lots"], "--budget"),
    (["--shape", "qwen2-1.5b", "--budget", "16"], "--budget 16: has no unit"),
    (["--shape", "qwen2-1.5b", "--device", "tpu"], "--device"),
    (["--shape", "qwen2-1.5b", "--max-new-tokens", "200000"], "--max-new-tokens"),
    (["--shape", "qwen2-1.5b", "--tree-pack"], "--tree-pack"),
    (["--shape", "qwen2-1.5b", "--model", "somewhere"], "--shape"),
    (["--model", "/nonexistent/folder"], "config.json"),
])
def test_bad_input_is_one_line_and_exit_2(argv, names, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and names in err


def test_argparse_errors_exit_2():
    with pytest.raises(SystemExit) as e:
        main(["--shape", "qwen2-1.5b", "--method", "ppo"])
    assert e.value.code == 2


def test_sizes():
    assert parse_size("16GB") == 16 * 10**9
    assert parse_size("15GiB") == parse_size(" 15 gib ") == 15 * 2**30
    assert parse_size("800MB") == 800 * 10**6
    assert parse_size("1.5e9B") == parse_size("1.5GB") == 1_500_000_000
    for bad in ("16", "1.5e9", "15G", "0GB", "-1GB", "GB", "16 XB", "1e999GB"):
        with pytest.raises(InputError, match="--budget"):
            parse_size(bad)
    assert gib(3 * 2**30) == "    3.00 GiB"

"""tools/bench_vs_trl.py gives minirl and TRL the same settings. No trl needed: its side is plain arguments."""

import importlib.util
from pathlib import Path

from minirl.cli import tiny_defaults
from minirl.config import build_parser, config_from_args
from minirl.lora import parse_layers

_spec = importlib.util.spec_from_file_location("bench_vs_trl", Path(__file__).parents[1] / "tools" / "bench_vs_trl.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_minirl_and_trl_run_the_same_settings(tmp_path):
    flags = ["--steps", "7", "--lr", "3e-4", "--beta", "0.05", "--lora-rank", "4", "--lora-layers", "last:2",
             "--lora-targets", "q_proj,k_proj", "--temperature", "0.7", "--max-new-tokens", "6", "--group-size", "5"]
    s = {**bench.resolve(bench.parse_args(flags)), "seed": 3}
    trainer, lora = bench.trl_settings(s, tmp_path)
    for method in ("grpo", "tspmo"):
        cmd = bench.minirl_command(method, s, tmp_path / method)
        cfg = config_from_args(build_parser().parse_args(cmd[cmd.index("minirl.train") + 1:]), tiny_defaults())
        assert cfg.method == method
        # what minirl.train will run with is what was asked for, and what TRL is given
        assert (cfg.steps, cfg.seed, cfg.group_size, cfg.lr, cfg.beta, cfg.temperature, cfg.max_new_tokens) == \
            (7, 3, 5, 3e-4, 0.05, 0.7, 6) == \
            (trainer["max_steps"], trainer["seed"], trainer["num_generations"], trainer["learning_rate"],
             trainer["beta"], trainer["temperature"], trainer["max_completion_length"])
        assert trainer["per_device_train_batch_size"] == cfg.group_size  # one prompt per step
        assert (cfg.lora_rank, cfg.lora_alpha) == (4, 8.0) == (lora["r"], lora["lora_alpha"])
        assert parse_layers(cfg.lora_layers, 3) == [1, 2] == lora["layers_to_transform"]
        assert cfg.lora_targets.split(",") == ["q_proj", "k_proj"] == lora["target_modules"]
        assert (cfg.task, cfg.digits, cfg.prompt_style) == (s["task"], tiny_defaults()["digits"], "plain")
    # the tiny model's tuned settings where no flag is given, as a bare `minirl.train` run takes them
    s = bench.resolve(bench.parse_args([]))
    assert (s["lr"], s["max_new_tokens"], s["steps"]) == (tiny_defaults()["lr"], tiny_defaults()["max_new_tokens"], 200)


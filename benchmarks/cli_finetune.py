"""``peftlab finetune`` end to end on the 1.1B Llama shape: the chunked loss against the model's own.

The CLI is run as a user runs it, in a subprocess, on a random-init model folder (the shape of
``common.LLAMA_1B``, bf16 safetensors) and a synthetic text dataset packed into 1024-token blocks:
batch 4 (4096 tokens a step), gradient checkpointing, AdamW, LoRA r=16 alpha=32 on all linear
layers, and QLoRA (the same on an NF4 base with double quantization). Each setup runs with
``train.chunked_loss`` true (the default) and false. Tokens/s is the median of the logged
windows after the first; memory is the run's ``torch.cuda.max_memory_allocated``.

    python benchmarks/cli_finetune.py          # GPU -> results/cli-<gpu>.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import LLAMA_1B, device_name, device_tag, require_cuda, versions, write_result  # noqa: E402

TOKENIZER = ROOT / "tests" / "fixtures" / "bpe_tokenizer"
SETUPS = [("LoRA", ["--method", "lora"]), ("QLoRA", ["--method", "qlora"])]
COMMON = ["--method.r", "16", "--method.alpha", "32", "--batch_size", "4", "--data.format", "text",
          "--data.max_seq_len", "1024", "--data.packing", "true", "--train.gradient_checkpointing", "true",
          "--lr", "1e-4", "--output.log_every", "2", "--output.tensorboard", "false"]


def make_model_folder(folder: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    config = LlamaConfig(**LLAMA_1B, pad_token_id=tokenizer.pad_token_id, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def make_dataset(path: Path, examples: int) -> None:
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "north", "seven", "quiet", "paper", "glass"]
    with path.open("w") as handle:
        for _ in range(examples):
            handle.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(10, 40)))}) + "\n")


def run_cli(model: Path, data: Path, out: Path, steps: int, extra: list[str]) -> dict:
    args = [sys.executable, "-m", "peftlab.cli", "finetune", "--model", str(model), "--data.train", str(data),
            "--output.dir", str(out), "--max_steps", str(steps), *COMMON, *extra]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0:
        return {"status": f"exit {done.returncode}", "stderr_tail": done.stderr[-2000:]}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in rows if "tokens_per_s" in r][1:]  # the first window holds compilation and warm-up
    loss_line = next((line for line in done.stdout.splitlines() + done.stderr.splitlines()
                      if line.startswith("loss: ")), "")
    return {"status": "ok", "tokens_per_s": statistics.median(r["tokens_per_s"] for r in windows),
            "memory_gib": max(r["memory_gib"] for r in rows if "memory_gib" in r),
            "losses": [r["loss"] for r in rows if "loss" in r], "loss_path": loss_line}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()
    device = require_cuda("benchmarks/cli_finetune.py")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_model_folder(tmp / "model")
        make_dataset(tmp / "train.jsonl", examples=args.steps * 4 * 60)
        for name, method_args in SETUPS:
            for chunked in ("true", "false"):
                row = {"setup": name, "chunked_loss": chunked == "true",
                       **run_cli(tmp / "model", tmp / "train.jsonl", tmp / f"{name}-{chunked}", args.steps,
                                 [*method_args, "--train.chunked_loss", chunked])}
                results.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
    print(f"\n{'setup':<8} {'loss':<10} {'tokens/s':>10} {'peak GiB':>9}")
    for name, _ in SETUPS:
        pair = {r["chunked_loss"]: r for r in results if r["setup"] == name and r["status"] == "ok"}
        for chunked, r in sorted(pair.items(), reverse=True):
            print(f"{name:<8} {'chunked' if chunked else 'model':<10} {r['tokens_per_s']:>10,.0f} {r['memory_gib']:>9.2f}")
        if len(pair) == 2:
            print(f"{name:<8} {'ratio':<10} {pair[True]['tokens_per_s'] / pair[False]['tokens_per_s']:>10.2f}x "
                  f"{pair[True]['memory_gib'] / pair[False]['memory_gib']:>8.2f}x")
    payload = {"benchmark": "peftlab finetune (CLI), 1.1B Llama shape, chunked loss vs the model's own",
               "device": device_name(device), "versions": versions("bitsandbytes"),
               "setup": {"model": LLAMA_1B, "args": COMMON, "steps": args.steps,
                         "tokens_per_s": "median of logged windows after the first",
                         "memory_gib": "max over the run of torch.cuda.max_memory_allocated"},
               "runs": results}
    print(f"wrote {write_result(f'cli-{device_tag(device)}', payload)}")


if __name__ == "__main__":
    main()

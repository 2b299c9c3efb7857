"""LoRA in five steps: wrap a model, train, save, reload, merge and export a plain HF model.

Runs on a CPU in under a minute with no network: the model is a small Llama built from a config
(random weights) that learns to continue a repeating token pattern.

    python examples/lora_quickstart.py [--out runs/quickstart]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import peftlab


def make_base_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def pattern_batch(batch_size: int = 8, length: int = 32) -> torch.Tensor:
    """Sequences counting upwards in steps of 3 from random starts: easy to learn, impossible at init."""
    starts = torch.randint(0, 256, (batch_size, 1))
    return (starts + 3 * torch.arange(length)) % 256


def main(out: Path) -> None:
    # 1. Wrap: LoRA on every linear layer; only the adapter trains.
    model = peftlab.wrap(make_base_model(), peftlab.LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    print(model.summary(), end="\n\n")

    # 2. Train a few steps with any optimizer over the trainable parameters.
    model.train()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    for step in range(1, 61):
        batch = pattern_batch()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1 or step % 20 == 0:
            print(f"step {step:3d}  loss {loss.item():.3f}")
    model.eval()

    # 3. Save the adapter (HF PEFT's format: adapter_config.json + adapter_model.safetensors).
    probe = pattern_batch(2)
    expected = model(input_ids=probe).logits
    model.save(out / "adapter")

    # 4. Reload it onto a fresh copy of the base model.
    reloaded = peftlab.load(make_base_model(), out / "adapter")
    assert torch.equal(reloaded(input_ids=probe).logits, expected)
    print(f"\nsaved and reloaded {out / 'adapter'}: identical logits")

    # 5. Merge for zero-latency serving and export a plain transformers model folder.
    merged = reloaded.merge_and_unload()
    merged.save_pretrained(out / "merged")
    plain = AutoModelForCausalLM.from_pretrained(out / "merged")
    error = (plain(input_ids=probe).logits - expected).abs().max() / expected.abs().max()
    print(f"exported {out / 'merged'}: reloads with plain transformers, max relative logits error {error:.2e}")
    prompt = probe[:, :8]
    generated = plain.generate(input_ids=prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    print(f"prompt {prompt[0].tolist()} -> continues {generated[0, 8:].tolist()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="output folder")
    main(parser.parse_args().out)

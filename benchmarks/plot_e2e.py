"""Plot ``results/e2e-<gpu>.json`` (from ``train_step.py``): tokens/s, peak memory and loss per step.

    python benchmarks/plot_e2e.py [--gpu h100]      # writes benchmarks/e2e-<gpu>.png
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
ORDER = ["hf_peft_lora", "peftlab_lora", "peftlab_lora_graphed", "hf_peft_qlora", "peftlab_qlora",
         "peftlab_qlora_graphed"]
LABELS = {"hf_peft_lora": "HF PEFT\nLoRA", "peftlab_lora": "peftlab\nLoRA", "peftlab_lora_graphed": "peftlab\nLoRA graphed",
          "hf_peft_qlora": "HF PEFT\nQLoRA", "peftlab_qlora": "peftlab\nQLoRA",
          "peftlab_qlora_graphed": "peftlab\nQLoRA graphed"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", default="h100")
    args = parser.parse_args()
    training = json.loads((HERE / "results" / f"e2e-{args.gpu}.json").read_text())["training"]
    runs = {(r["run"], r["gc"]): r for r in training["runs"] if r["status"] == "ok"}
    names = [n for n in ORDER if (n, True) in runs]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    width = 0.38
    for ax, key, title in ((axes[0], "tokens_per_s", "tokens/s (higher is better)"),
                           (axes[1], "peak_gib", "peak GiB (lower is better)")):
        for offset, gc in ((-width / 2, True), (width / 2, False)):
            values = [runs[(n, gc)][key] if (n, gc) in runs else 0 for n in names]
            bars = ax.bar([i + offset for i in range(len(names))], values, width,
                          label=f"checkpointing {'on' if gc else 'off'}")
            ax.bar_label(bars, fmt="%.0f" if key == "tokens_per_s" else "%.2f", fontsize=7)
        ax.set_xticks(range(len(names)), [LABELS[n] for n in names], fontsize=8)
        ax.set_title(title)
        ax.legend(fontsize=8)
    for name in names:
        axes[2].plot(runs[(name, True)]["losses"], label=LABELS[name].replace("\n", " "), linewidth=1)
    axes[2].set_title("loss per step (checkpointing on)")
    axes[2].set_xlabel("step")
    axes[2].legend(fontsize=7)
    fig.suptitle(f"1.1B Llama, batch 4 x 1024, LoRA r=16 on all linear layers - {training['device']}")
    fig.tight_layout()
    out = HERE / f"e2e-{args.gpu}.png"
    fd, tmp = tempfile.mkstemp(dir=HERE, suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

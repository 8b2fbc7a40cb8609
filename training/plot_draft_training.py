"""Draw a draft training run's loss curve (train and validation soft cross-entropy, validation top-1
agreement with the target) and its held-out acceptance, beside the run's JSON.

    python training/plot_draft_training.py   # needs matplotlib (pip install matplotlib)
    python training/plot_draft_training.py training/results/draft_training_gpu_2026-11-27-h100x4.json \
        training/results/draft_acceptance_gpu_2026-11-27.json
    python training/plot_draft_training.py training/results/eagle_training_gpu_2026-11-28-h200x4.json \
        training/results/eagle_acceptance_gpu_2026-11-28.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    run_file = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS / "draft_training.json"
    run = json.loads(run_file.read_text())
    acc_file = Path(sys.argv[2]) if len(sys.argv) > 2 else RESULTS / "draft_acceptance.json"
    acc = json.loads(acc_file.read_text()) if acc_file.is_file() else None
    if acc and "subset" in acc:  # eval_eagle.py's report: the served head's
        acc = acc.get("subset_context", acc["subset"])
    fig, axes = plt.subplots(1, 3 if acc else 2, figsize=(15 if acc else 10, 4))
    curve = run["curve"]
    train = [r for r in curve if "loss" in r]
    val = [r for r in curve if "val_loss" in r]
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.7, label="train")
    axes[0].plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("soft cross-entropy vs target top-k (nats)")
    axes[1].plot([r["step"] for r in val], [r["val_top1"] for r in val], "o-")
    axes[1].set_ylabel("validation: draft argmax = target top-1")
    for ax in axes[:2]:
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    if acc:
        for group in ("chat", "code", "all"):
            ks = range(1, len(acc[group]["per_position"]) + 1)
            axes[2].plot(list(ks), acc[group]["per_position"], "o-", label=group)
        axes[2].set_xlabel("draft position i")
        axes[2].set_ylabel("P(draft i kept | 1..i-1 kept), held-out")
        axes[2].set_ylim(0, 1)
        axes[2].grid(True, alpha=0.3)
        axes[2].legend()
    if "args" in run:  # train_eagle.py's summary
        args = run["args"]
        title = (
            f"EAGLE-1 draft for SmolLM2-135M-Instruct: {args.get('layers', 1)} layer(s), MLP "
            f"{args['intermediate']}, {args['passes']} unrolled positions, {run['steps']} steps, "
            f"{run['train_seconds'] / 60:.1f} min on {run.get('device', 'CPU')}, "
            f"{run['train_rows'] / 1e6:.2f}M rows"
        )
    else:
        title = (
            f"draft for SmolLM2-135M-Instruct: {run['num_layers']} layers, MLP {run['intermediate']}, "
            f"init {run['init']} ({run['layers']}), {run['steps']} steps, {run['train_seconds'] / 60:.1f} "
            f"min on {run.get('device', 'CPU')}, {run['train_predicted_tokens'] / 1e6:.2f}M tokens"
        )
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(run_file.with_suffix(".png"), dpi=80)


if __name__ == "__main__":
    main()

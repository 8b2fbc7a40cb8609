"""Draw the PNG beside a recorded results JSON (benchmarks/results/*.json): decode, kernels, tensor
parallel, speculative decoding.

python benchmarks/plot_results.py benchmarks/results/decode-2026-11-22-h100.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from bench_decode import LLAMA3_8B, weight_bytes  # noqa: E402


def plot_decode(rows: list[dict], out: Path) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    by_engine: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("bench") == "decode":
            by_engine[r["engine"]].append(r)
    for engine, rs in by_engine.items():
        rs.sort(key=lambda r: r["batch"])
        ax1.plot([r["batch"] for r in rs], [r["ms_per_token"] for r in rs], "o-", label=engine)
        ax2.plot([r["batch"] for r in rs], [r["output_tok_s"] for r in rs], "o-", label=engine)
    meta = rows[0]
    floor = 1e3 * weight_bytes(LLAMA3_8B) / (meta["copy_tb_s"] * 1e12)
    ax1.axhline(floor, ls="--", c="gray", label=f"weight-read floor {floor:.2f} ms")
    for ax, label in ((ax1, "ms per decode step"), (ax2, "output tokens/s")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)
    fig.suptitle(f"Llama-3-8B shape, bf16, {meta['device']}, {meta['date']}, commit {meta['commit']}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot_kernels(rows: list[dict], out: Path) -> None:
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    for r in rows:
        if "frac_of_ceiling" not in r or r.get("error"):
            continue
        shape = ",".join(f"{k}={r[k]}" for k in ("batch", "tokens", "context_len", "prompt_len") if k in r)
        key = f"{r['op']} {r.get('model', '')} {shape}"
        name = r["engine"] + ("-graph" if r.get("timing") == "cudagraph" else "")
        groups[key][name] = max(groups[key].get(name, 0.0), r["frac_of_ceiling"])
    keys = sorted(groups)
    engines = sorted({e for g in groups.values() for e in g})
    fig, ax = plt.subplots(figsize=(12, max(4, 0.22 * len(keys))))
    h = 0.8 / len(engines)
    for i, e in enumerate(engines):
        ax.barh([k + i * h for k in range(len(keys))], [groups[k].get(e, 0) for k in keys], h, label=e)
    ax.set_yticks([k + 0.4 for k in range(len(keys))], keys, fontsize=6)
    ax.set_xlabel("fraction of the measured ceiling (copy bandwidth or bf16 GEMM rate)")
    ax.legend(fontsize=7)
    meta = rows[0]
    ax.set_title(f"kernels, {meta['device']}, {meta['date']}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot_tp(rows: list[dict], out: Path) -> None:
    """Left: each all-reduce's us per op in a CUDA graph by batch; right: decode per engine and batch."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    by_collective: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r["bench"] == "allreduce" and r["mode"] == "graph":
            by_collective[r["engine"]].append(r)
    for name, rs in by_collective.items():
        rs.sort(key=lambda r: r["batch"])
        ax1.plot([r["batch"] for r in rs], [r["us_per_op"] for r in rs], "o-", label=name)
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("batch (rows of hidden 4096, bf16)")
    ax1.set_ylabel("us per all-reduce, in a CUDA graph")
    ax1.grid(True, alpha=0.3)
    ax1.legend(fontsize=8)
    decode = [r for r in rows if r["bench"] == "tp-decode"]
    labels = [f"{r['engine']}\nbatch {r['batch']}" for r in decode]
    ax2.barh(labels, [r["ms_per_token"] for r in decode])
    for i, r in enumerate(decode):
        ax2.text(
            r["ms_per_token"], i, f" {r['ms_per_token']:.2f} ms, {r['output_tok_s']:,.0f} tok/s", va="center"
        )
    ax2.set_xlabel("ms per decode step")
    ax2.tick_params(axis="y", labelsize=7)
    ax2.set_xlim(0, 1.6 * max(r["ms_per_token"] for r in decode))
    meta = rows[0]
    fig.suptitle(
        f"tensor parallel, {meta['model']}, {meta['device']} x2, {meta['date']}, commit {meta['commit']}"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def plot_spec(rows: list[dict], out: Path) -> None:
    """bench_spec.py: speedup over no speculation by k (one line per proposer, where a run has several,
    prompts, batch and acceptance), and acceptance per draft position."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    groups: dict[tuple, list[dict]] = defaultdict(list)
    several = len({r.get("proposer") for r in rows if r["k"] != 0}) > 1
    for r in rows:
        if r["k"] != 0:
            proposer = r.get("proposer", "") if several else ""
            groups[(proposer, r["prompts"], r["batch"], r["synthetic_acceptance"])].append(r)
    one_k = len({r["k"] for rs in groups.values() for r in rs if r["k"] != "adaptive"}) == 1
    cases = sorted({key[1:] for key in groups}, key=str)  # (prompts, batch, acceptance)
    proposers = sorted({key[0] for key in groups})
    for (proposer, prompts, batch, acceptance), rs in sorted(groups.items(), key=str):
        fixed = sorted((r for r in rs if r["k"] != "adaptive"), key=lambda r: r["k"])
        name = f"{proposer} {prompts} b={batch}".strip()
        name += f" A={acceptance}" if acceptance is not None else ""
        if one_k:  # one fixed k: bars per case, the proposers side by side (fixed k solid, adaptive hatched)
            width = 0.8 / (2 * len(proposers))
            at = (
                cases.index((prompts, batch, acceptance))
                - 0.4
                + width * (2 * proposers.index(proposer) + 0.5)
            )
            color = f"C{proposers.index(proposer)}"
            ax1.bar(at, fixed[0]["speedup"], width, color=color, label=f"{proposer} k={fixed[0]['k']}")
            for r in rs:
                if r["k"] == "adaptive":
                    ax1.bar(
                        at + width,
                        r["speedup"],
                        width,
                        color=color,
                        alpha=0.5,
                        hatch="//",
                        label=f"{proposer} adaptive",
                    )
        else:
            line = ax1.plot([r["k"] for r in fixed], [r["speedup"] for r in fixed], "o-", label=name)[0]
            for r in rs:
                if r["k"] == "adaptive":
                    ax1.axhline(r["speedup"], ls=":", c=line.get_color(), label=f"{name} adaptive")
        longest = max(fixed, key=lambda r: r["k"])
        ax2.plot(range(1, len(longest["acceptance_at"]) + 1), longest["acceptance_at"], "o-", label=name)
    ax1.axhline(1.0, c="gray", lw=0.8)
    if one_k:
        ax1.set_xticks(range(len(cases)), [f"b={b} A={a}" for _, b, a in cases])
        handles, labels = ax1.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        ax1.legend(unique.values(), unique.keys(), fontsize=7)
    else:
        ax1.set_xlabel("k (drafts per step)")
    ax1.set_ylabel("tokens/s over no speculation")
    ax2.set_xlabel("draft position")
    ax2.set_ylabel("acceptance (of verifies reaching it)")
    ax2.set_ylim(0, 1)
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        if ax is ax2 or not one_k:
            ax.legend(fontsize=7)
    meta = rows[0]
    fig.suptitle(
        f"speculative decoding, {meta['model']}, {meta['device']}, {meta['date']}, commit {meta['commit']}"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    for arg in sys.argv[1:]:
        path = Path(arg)
        rows = json.loads(path.read_text())
        out = path.with_suffix(".png")
        kind = rows[0].get("bench")
        plot = (
            plot_kernels
            if kind == "kernel"
            else plot_tp
            if kind in ("allreduce", "tp-decode")
            else plot_spec
            if kind == "spec"
            else plot_decode
        )
        plot(rows, out)
        print(out)


if __name__ == "__main__":
    main()

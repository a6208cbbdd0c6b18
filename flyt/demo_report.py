"""The demo's report: a results table, what the filters learned, plots, and the commands to reproduce."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

SECTIONS = ("## Results", "## What M-FLYT learned", "## How well the scores separate clean from corrupted",
            "## What each subset selected", "## Training curves", "## Reproduce")


def _auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random positive outranks a random negative (ties count half)."""
    ranks = pd.Series(score).rank().to_numpy()
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _outcome(table: pd.DataFrame) -> str:
    """Each filter against no filter and random, by the gap in means and the seeds' spread."""
    def versus(method: str, other: str) -> str:
        gap = table["mean"][method] - table["mean"][other]
        if min(table["count"][method], table["count"][other]) < 2:
            return f"is {'above' if gap > 0 else 'below'} {other} ({gap:+.3f}, one seed)"
        spread = max(table["std"][method], table["std"][other])
        verdict = "beats" if gap > spread else "is within the spread of" if gap > -spread else "loses to"
        return f"{verdict} {other} ({gap:+.3f})"

    parts = [f"**{m}** {versus(m, 'no filter')} and {versus(m, 'random')}"
             for m in table.index if m not in ("no filter", "random") and {"no filter", "random"} <= set(table.index)]
    return f"best mean accuracy: **{table['mean'].idxmax()}** ({table['mean'].max():.3f}). " + "; ".join(parts) + \
        ". A gap counts as a win only when larger than the larger seed std of the two; with one seed it is not conclusive."


def _plots(root: Path, truth: pd.DataFrame, scored: dict[str, pd.DataFrame], selections: dict[str, pd.Series]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = root / "report"
    fig, axes = plt.subplots(1, len(scored), figsize=(5 * len(scored), 3.5))
    for ax, (name, frame) in zip(np.atleast_1d(axes), scored.items()):
        for kind, group in frame.groupby("kind"):
            ax.hist(group.score, bins=40, alpha=0.5, label=kind, density=True)
        ax.set_title(f"{name} scores by kind")
        ax.legend(fontsize=7)
    _save(fig, figs / "score_histograms.png")

    kinds = sorted(truth.kind.unique())
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / len(selections)
    for i, (name, counts) in enumerate(selections.items()):
        per_kind = counts.groupby(truth.set_index("uid").kind.reindex(counts.index).to_numpy()).sum()
        ax.bar(np.arange(len(kinds)) + i * width, [per_kind.get(k, 0) for k in kinds], width, label=name)
    ax.set_xticks(np.arange(len(kinds)) + 0.4 - width / 2, kinds, fontsize=8)
    ax.set_ylabel("training examples (with repeats)")
    ax.legend(fontsize=7)
    _save(fig, figs / "selection_by_kind.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for name in ("mflyt", "flyt"):
        lines = [json.loads(l) for l in (root / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        axes[0].plot([l["step"] for l in lines], [l["downstream_loss/digits"] for l in lines], label=name)
        if name == "mflyt":
            for key in [k for k in lines[-1] if k.startswith("mixer/")]:
                axes[1].plot([l["step"] for l in lines], [l[key] for l in lines], label=key.split("/")[1])
    axes[0].set_title("downstream loss at theta' (digits, train split)")
    axes[1].set_title("M-FLYT mixer weights")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    _save(fig, figs / "training_curves.png")


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(root: Path, plan, truth: pd.DataFrame, results: list[dict], commands: list[str],
                 fields: list[str], seconds: float) -> Path:
    import torch

    from flyt.subset import array_to_uids, load_subset

    (root / "report").mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(results).groupby("method", sort=False).acc1.agg(["mean", "std", "count"])
    usable = truth[truth.kind != "broken"]
    scored = {}
    for label, name in (("base CLIP score", "clip"), ("FLYT", "flyt"), ("M-FLYT", "mflyt")):
        frame = pd.read_parquet(root / "data" / f"{name}_scores.parquet")
        scored[label] = frame.merge(usable[["uid", "kind", "clean", "aligned"]], on="uid")
    subsets = root / "data" / "subsets"
    selections = {}
    for path in sorted(subsets.glob("*.npy")):
        uids = pd.Series(array_to_uids(load_subset(path)).to_pylist())
        selections[path.stem] = uids.value_counts()
    _plots(root, usable, scored, selections)
    mixer = torch.load(root / "runs" / "mflyt" / "checkpoints" / "scoring_epoch_latest.pt", weights_only=True)
    weights = mixer["state_dict"]["layers.0.weight"].flatten().tolist()

    lines = ["# flyt demo report", "",
             f"Pool: {len(truth)} digit image-caption pairs ({int(truth.clean.sum())} clean; corrupted kinds: "
             f"{', '.join(f'{k} {v}' for k, v in truth.kind.value_counts().items() if k != 'clean')}). "
             f"Every CLIP below trains {plan.clip_steps} steps of batch {plan.batch} on its subset; accuracy is "
             f"zero-shot top-1 on the digits task's held-out test split. Total time {seconds:.0f} s.", "",
             SECTIONS[0], "", "| method | acc1 mean | ± std | seeds |", "|---|---|---|---|"]
    for method, row in table.iterrows():
        std = "" if row["count"] < 2 else f"{row['std']:.3f}"
        lines.append(f"| {method} | {row['mean']:.3f} | {std} | {int(row['count'])} |")
    lines += ["", "Measured outcome: " + _outcome(table), "", SECTIONS[1], "", "| input score | weight |", "|---|---|"]
    lines += [f"| {f} | {w:+.4f} |" for f, w in zip(fields, weights)]
    lines += ["", SECTIONS[2], "", "| scores | AUC clean vs rest | AUC aligned vs rest | std |", "|---|---|---|---|"]
    for name, frame in scored.items():
        score = frame.score.to_numpy()
        lines.append(f"| {name} | {_auc(score, frame.clean.to_numpy()):.3f} | {_auc(score, frame.aligned.to_numpy()):.3f} "
                     f"| {score.std():.2f} |")
    lines += ["", "AUC: the chance that a random clean (or aligned: clean or near-duplicate) pair outscores a random "
              "other one. SCS draws in proportion to exp(score), so a score spread (std) well below 1 gives a "
              "selection close to uniform however good the ranking; the base CLIP score is standardised.", "",
              "![score histograms](score_histograms.png)", "", SECTIONS[3], "",
              "| subset | examples | unique | clean share | aligned share |", "|---|---|---|---|---|"]
    clean, aligned = set(usable.uid[usable.clean]), set(usable.uid[usable.aligned])
    for name, counts in selections.items():
        share = counts[counts.index.isin(clean)].sum() / counts.sum()
        share_aligned = counts[counts.index.isin(aligned)].sum() / counts.sum()
        lines.append(f"| {name} | {int(counts.sum())} | {len(counts)} | {share:.2f} | {share_aligned:.2f} |")
    lines += ["", "![selection by kind](selection_by_kind.png)", "", SECTIONS[4], "",
              "![training curves](training_curves.png)", "", SECTIONS[5], "", "```bash", *commands, "```", ""]
    path = root / "report" / "report.md"
    path.write_text("\n".join(lines))
    print("\n".join(lines[6:6 + len(table) + 4]))
    return path

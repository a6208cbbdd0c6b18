"""The demo's report: a results table, what the filters learned, plots, and the commands to reproduce."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

SECTIONS = ("## Results", "## What M-FLYT learned", "## How well the scores separate clean from corrupted",
            "## What each subset selected", "## Training curves", "## Diagnostics and validation", "## Reproduce")
RUNS = {"FLYT": "flyt", "M-FLYT": "mflyt"}
DIAGNOSTICS = {  # metric -> what a user reads from it
    "diag/score_std": "score spread in logits; SCS draws in proportion to exp(score), so well below 1 it draws "
                      "nearly uniformly unless the temperature is lowered (what --unique_fraction does)",
    "diag/ess_share": "effective sample size of the batch's weights over the batch size; 1 is uniform weighting, "
                      "a fall means the weighting concentrates on few examples",
    "diag/probe_spearman": "rank correlation with the starting scorer on a fixed probe batch; near 1 the ranking "
                           "has not moved from the start (FLYT: the CLIP score of --cos_sim_init; blank for M-FLYT, whose mixer "
                           "starts at 0 with constant scores)",
    "val/gain": "held-out task loss after one step with uniform weights minus with the learned ones; above 0 the "
                "weighting helps on task data it never trained on, and the best step is kept",
}


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


def _metrics(root: Path) -> dict[str, pd.DataFrame]:
    """Each run's metrics.jsonl as a frame, one row per step (log and validation lines merged)."""
    frames = {}
    for label, name in RUNS.items():
        lines = [json.loads(l) for l in (root / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        frames[label] = pd.DataFrame(lines).groupby("step").first()
    return frames


def _diagnostics_table(metrics: dict[str, pd.DataFrame], best: dict[str, int | None], rows: int = 5) -> list[str]:
    """Up to ``rows`` evenly spaced steps per run (first, last and best included), and what to read from each column."""
    keys = list(DIAGNOSTICS)
    lines = ["| run | step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for label, frame in metrics.items():
        frame = frame[frame[keys].notna().any(axis=1)]
        steps = set(frame.index[np.unique(np.linspace(0, len(frame) - 1, rows).round().astype(int))])
        for step in sorted(steps | ({best[label]} if best[label] in frame.index else set())):
            mark = " (best)" if step == best[label] else ""
            values = " | ".join(f"{frame[k][step]:+.3g}" if pd.notna(frame[k][step]) else "" for k in keys)
            lines.append(f"| {label} | {step}{mark} | {values} |")
    return lines + [""] + [f"- `{k}`: {text}." for k, text in DIAGNOSTICS.items()]


def _plots(root: Path, truth: pd.DataFrame, scored: dict[str, pd.DataFrame], selections: dict[str, pd.Series],
           metrics: dict[str, pd.DataFrame]) -> None:
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
    for label, frame in metrics.items():
        loss = frame["downstream_loss/digits"].dropna()
        axes[0].plot(loss.index, loss, label=label)
        for key in [k for k in frame if k.startswith("mixer/")]:
            axes[1].plot(frame[key].dropna().index, frame[key].dropna(), label=key.split("/")[1])
    axes[0].set_title("downstream loss at theta' (digits, train split)")
    axes[1].set_title("M-FLYT mixer weights")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    _save(fig, figs / "training_curves.png")

    fig, axes = plt.subplots(1, len(DIAGNOSTICS), figsize=(4 * len(DIAGNOSTICS), 3.2))
    for ax, key in zip(axes, DIAGNOSTICS):
        for label, frame in metrics.items():
            if key in frame:
                ax.plot(frame[key].dropna().index, frame[key].dropna(), marker=".", label=label)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    _save(fig, figs / "diagnostics.png")


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(root: Path, plan, truth: pd.DataFrame, results: list[dict], commands: list[str],
                 fields: list[str], seconds: float) -> Path:
    import torch

    from flyt.demo.pipeline import scoring_checkpoint
    from flyt.data.subset import array_to_uids, load_subset

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
    metrics = _metrics(root)
    _plots(root, usable, scored, selections, metrics)
    used = {label: scoring_checkpoint(root / "runs" / name) for label, name in RUNS.items()}
    best = {label: torch.load(path, weights_only=True)["flyt"]["step"] if path.name == "scoring_best.pt" else None
            for label, path in used.items()}
    mixer = torch.load(used["M-FLYT"], weights_only=True)
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
              "| subset | examples | distinct | SCS temperature | clean share | aligned share |", "|---|---|---|---|---|---|"]
    clean, aligned = set(usable.uid[usable.clean]), set(usable.uid[usable.aligned])
    for name, counts in selections.items():
        share = counts[counts.index.isin(clean)].sum() / counts.sum()
        share_aligned = counts[counts.index.isin(aligned)].sum() / counts.sum()
        temperature = json.loads((subsets / f"{name}.npy.summary.json").read_text())["temperature"]
        temperature = "" if temperature is None else f"{temperature:.3g}"
        lines.append(f"| {name} | {int(counts.sum())} | {len(counts)} | {temperature} | {share:.2f} | {share_aligned:.2f} |")
    lines += ["", "Top-k keeps a share of the usable pool; SCS draws as many examples as the pool holds, with "
              "repeats, at the temperature (found by `--unique_fraction`) that leaves the same share distinct. "
              "Every CLIP trains the same number of steps.", "",
              "![selection by kind](selection_by_kind.png)", "", SECTIONS[4], "",
              "![training curves](training_curves.png)", "", SECTIONS[5], "",
              "Pool scored with " + "; ".join(
                  f"{label}: the best validation step's checkpoint (step {best[label]})" if best[label] is not None
                  else f"{label}: the last checkpoint (no scoring_best.pt)" for label in RUNS) + ".", "",
              *_diagnostics_table(metrics, best), "", "![diagnostics](diagnostics.png)", "",
              SECTIONS[6], "", "```bash", *commands, "```", ""]
    path = root / "report" / "report.md"
    path.write_text("\n".join(lines))
    print("\n".join(lines[6:6 + len(table) + 4]))
    return path

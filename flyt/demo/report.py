"""The demo's report: results, paired comparisons over seeds, the compute and distinct examples of every run,
what the filters learned, plots, and the commands to reproduce."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

SECTIONS = ("## Results", "## Comparisons over seeds", "## Equal compute and distinct examples",
            "## What M-FLYT learned", "## How well the scores separate clean from corrupted",
            "## What each subset selected", "## Training curves", "## Diagnostics and validation", "## Reproduce")
RUNS = {"FLYT": "flyt", "M-FLYT": "mflyt"}
TRAIN_CLIP_DONE = "flyt train-clip: done "  # the closing line of `flyt train-clip`, followed by its JSON summary
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


LEVEL = 0.95  # coverage of each comparison's interval
PLATEAU = 0.2  # a CLIP run whose last loss is this close to ln(batch) has not left its initial plateau


@dataclass(frozen=True)
class Comparison:
    """``method`` minus ``other`` in accuracy, paired by seed: the mean over the seeds both ran and its paired
    t interval (none with fewer than 2 seeds)."""

    method: str
    other: str
    seeds: int
    mean: float
    low: float | None = None
    high: float | None = None

    @property
    def verdict(self) -> str:
        if self.low is not None and self.low > 0:
            return "better"
        if self.high is not None and self.high < 0:
            return "worse"
        return f"not distinguishable with {self.seeds} seed{'' if self.seeds == 1 else 's'}"


def compare(results: pd.DataFrame, method: str, other: str) -> Comparison:
    """Paired by seed: seed s trained both subsets' CLIPs from the same start, so their difference removes
    what the seed does to both; the t interval is over the per-seed differences."""
    from scipy import stats

    acc = results.pivot(index="seed", columns="method", values="acc1")[[method, other]].dropna()
    diff = (acc[method] - acc[other]).to_numpy()
    if len(diff) < 2:
        return Comparison(method, other, len(diff), float(diff.mean()) if len(diff) else float("nan"))
    half = stats.t.ppf((1 + LEVEL) / 2, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
    return Comparison(method, other, len(diff), float(diff.mean()), float(diff.mean() - half), float(diff.mean() + half))


def comparisons(methods) -> list[tuple[str, str]]:
    """The questions the demo asks, among the methods present: every filter against no filter and random;
    each learned filter (and the oracle) against the best simple baseline, CLIP-score top-k; FLYT against
    M-FLYT; SCS against top-k on the same scores."""
    learned = [m for m in methods if "FLYT" in m] + [m for m in methods if m.startswith("oracle")]
    pairs = [(m, base) for base in ("no filter", "random") for m in methods if m not in ("no filter", base)]
    pairs += [(m, "CLIP-score top-k") for m in learned]
    pairs += [("FLYT + SCS", "M-FLYT + SCS"), ("M-FLYT + SCS", "M-FLYT + top-k")]
    return [(m, o) for m, o in pairs if m in methods and o in methods]


def _outcome(results: pd.DataFrame) -> list[str]:
    """A table of every comparison, one sentence per baseline, and the answer to the demo's question in plain words."""
    methods = list(dict.fromkeys(results["method"]))
    done = [compare(results, m, o) for m, o in comparisons(methods)]
    lines = [f"| comparison | paired seeds | mean difference | {LEVEL:.0%} interval | verdict |", "|---|---|---|---|---|"]
    for c in done:
        interval = "" if c.low is None else f"[{c.low:+.3f}, {c.high:+.3f}]"
        lines.append(f"| {c.method} vs {c.other} | {c.seeds} | {c.mean:+.3f} | {interval} | {c.verdict} |")
    lines.append("")
    for other in dict.fromkeys(c.other for c in done):  # one sentence per baseline, methods grouped by verdict
        verdicts = {}
        for c in done:
            if c.other == other:
                verdicts.setdefault(c.verdict, []).append(c.method)
        lines.append(f"- Against **{other}**: " + "; ".join(f"{v}: {', '.join(ms)}" for v, ms in verdicts.items()) + ".")
    learned = [c for c in done if c.other == "CLIP-score top-k" and "FLYT" in c.method]
    if learned:
        wins = [c.method for c in learned if c.verdict == "better"]
        rest = "; ".join(f"{c.method} is {c.verdict}" for c in learned if c.verdict != "better")
        answer = f"Yes: {', '.join(wins)}" + (f" (while {rest})" if rest else "") if wins else f"No: {rest}"
        lines += ["", f"**Does a learned filter beat the best simple baseline (CLIP-score top-k) here?** {answer}."]
    check = next((c for c in done if c.method.startswith("oracle") and c.other == "no filter"), None)
    if check is not None and check.verdict != "better":
        verdict = "is worse than" if check.verdict == "worse" else f"and no filter are {check.verdict}"
        lines += ["", f"**The yardstick fails its own check**: the oracle, which keeps only clean pairs, {verdict}. "
                  "CLIPs this short cannot then show whether any filter works; the verdicts above say what these runs measured, not what the filters are worth (see the runs left on the initial plateau "
                  "in the next section)."]
    seeds = results.seed.nunique()
    lines += ["", f"Each interval is a paired t interval ({LEVEL:.0%}) over the per-seed differences; \"better\" "
              "and \"worse\" mean it excludes 0. It measures the randomness of the CLIP trainings (initialisation, "
              "data order, augmentation) given one run of everything before them (pool, base CLIP, FLYT and M-FLYT "
              "training, each subset's draw), so it says whether these subsets train different CLIPs, not whether "
              f"another FLYT run would. {len(done)} comparisons at {LEVEL:.0%} each: about one in "
              f"{round(1 / (1 - LEVEL))} may exclude 0 by chance."
              + (" With one seed there is no interval: nothing here is distinguishable." if seeds < 2 else "")]
    return lines


def training_budget(root: Path, run: str) -> dict:
    """What one CLIP training did, from its own outputs: its last logged step (metrics.jsonl), the batch size
    on the command line its log records, and the distinct samples it reports having seen. The subset
    stream yields only full batches, so samples seen = steps x batch."""
    log = (root / "logs" / f"{run}.log").read_text().splitlines()
    argv = shlex.split(next(line for line in log if line.startswith("$ flyt train-clip "))[2:])
    done = next(line for line in log if line.startswith(TRAIN_CLIP_DONE))
    last = json.loads((root / "runs" / run / "metrics.jsonl").read_text().splitlines()[-1])
    batch = int(argv[argv.index("--batch_size") + 1])
    return {"steps": last["step"], "batch": batch, "samples_seen": last["step"] * batch, "final_loss": last["loss"],
            "distinct_seen": json.loads(done[len(TRAIN_CLIP_DONE):])["unique_samples_seen"]}


def _compute_section(root: Path, results: pd.DataFrame, selections: dict[str, pd.Series]) -> list[str]:
    """Equal compute (samples seen) checked run by run, and the distinct examples of each subset."""
    budget = pd.DataFrame([{**row, **training_budget(root, row["run"])} for row in results.to_dict("records")])
    seen = budget.samples_seen.unique()
    if len(seen) == 1:
        head = (f"Every one of the {len(budget)} CLIPs trained on **{seen[0]:,} samples seen** ({budget.steps[0]} steps "
                f"of batch {budget.batch[0]}, read from each run's metrics.jsonl and logged command): equal compute, "
                "DataComp's rule. A subset with fewer distinct examples is seen more often per example.")
    else:
        head = (f"**Compute is NOT equal**: the {len(budget)} CLIPs saw between {seen.min():,} and {seen.max():,} "
                "samples, so the comparisons below mix filtering with training length.")
    flat = budget[np.log(budget.batch) - budget.final_loss < PLATEAU]
    names = [f"{m} (seed{'s' if len(g) > 1 else ''} {', '.join(map(str, g.seed))})" for m, g in flat.groupby("method", sort=False)]
    head += (f" {len(flat)} of the {len(budget)} runs end with a training loss within {PLATEAU} of ln(batch), the loss "
             f"of a CLIP that has learnt nothing: {'; '.join(names) or 'none'}.")
    lines = [head, "", "| method | subset | distinct in subset | examples (with repeats) | samples seen per run | "
             "distinct seen per run |", "|---|---|---|---|---|---|"]
    for (method, subset), group in budget.groupby(["method", "subset"], sort=False):
        counts = selections[subset]
        low, high = group.distinct_seen.min(), group.distinct_seen.max()
        lines.append(f"| {method} | {subset} | {len(counts)} | {int(counts.sum())} | "
                     f"{', '.join(f'{v:,}' for v in group.samples_seen.unique())} | {low if low == high else f'{low}-{high}'} |")
    return lines


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


def _separation(score: np.ndarray, frame: pd.DataFrame) -> str:
    """AUC clean vs rest and aligned vs rest, as two table cells."""
    return f"{_auc(score, frame.clean.to_numpy()):.3f} | {_auc(score, frame.aligned.to_numpy()):.3f}"


def write_report(root: Path, plan, truth: pd.DataFrame, results: list[dict], commands: list[str],
                 fields: list[str], seconds: float) -> Path:
    import torch

    from flyt.demo.pipeline import scoring_checkpoint
    from flyt.demo.steps import CLIP_SCORE
    from flyt.data.subset import array_to_uids, load_subset

    (root / "report").mkdir(parents=True, exist_ok=True)
    results = pd.DataFrame(results)
    table = results.groupby("method", sort=False).acc1.agg(["mean", "std", "count"])
    per_seed = results.pivot(index="method", columns="seed", values="acc1").reindex(table.index)
    usable = truth[truth.kind != "broken"][["uid", "kind", "clean", "aligned"]]
    inputs = pd.concat(pd.read_parquet(p) for p in sorted((root / "data" / "scores").glob("*.parquet")))
    inputs = inputs.merge(usable, on="uid")
    scored = {"base CLIP score": inputs.assign(score=inputs[CLIP_SCORE])}
    for label, name in RUNS.items():
        scored[label] = pd.read_parquet(root / "data" / f"{name}_scores.parquet").merge(usable, on="uid")
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
    mixer = torch.load(used["M-FLYT"], weights_only=True)["state_dict"]
    weights = mixer["layers.0.weight"].flatten().tolist()

    lines = ["# flyt demo report", "",
             f"Pool: {len(truth)} digit image-caption pairs ({int(truth.clean.sum())} clean; corrupted kinds: "
             f"{', '.join(f'{k} {v}' for k, v in truth.kind.value_counts().items() if k != 'clean')}). "
             f"Every CLIP below trains {plan.clip_steps} steps of batch {plan.clip_batch} on its subset, once per seed "
             f"({results.seed.nunique()} seed(s), the same for every subset); accuracy is zero-shot top-1 on the digits "
             f"task's held-out test split (chance 0.10). Total time {seconds:.0f} s.", "",
             SECTIONS[0], "", "| method | " + " | ".join(f"seed {s}" for s in per_seed) + " | mean | ± std |",
             "|---" * (len(per_seed.columns) + 3) + "|"]
    for method, row in table.iterrows():
        std = "" if row["count"] < 2 else f"{row['std']:.3f}"
        seeds = " | ".join("" if pd.isna(v) else f"{v:.3f}" for v in per_seed.loc[method])
        lines.append(f"| {method} | {seeds} | {row['mean']:.3f} | {std} |")
    lines += ["", SECTIONS[1], "", *_outcome(results), "", SECTIONS[2], "", *_compute_section(root, results, selections),
              "", SECTIONS[3], "", "The mixer's weight on each standardised input, beside how well that input alone "
              "and the mix separate clean (and aligned) pairs from the rest.", "",
              "| M-FLYT input | weight | AUC clean vs rest | AUC aligned vs rest |", "|---|---|---|---|"]
    lines += [f"| {f} | {w:+.4f} | {_separation(inputs[f].to_numpy(), inputs)} |" for f, w in zip(fields, weights)]
    lines += [f"| (bias) | {mixer['layers.0.bias'].item():+.4f} | | |",
              f"| **the mix (M-FLYT score)** | | {_separation(scored['M-FLYT'].score.to_numpy(), scored['M-FLYT'])} |"]
    lines += ["", SECTIONS[4], "", "| scores | AUC clean vs rest | AUC aligned vs rest | std |", "|---|---|---|---|"]
    for name, frame in scored.items():
        lines.append(f"| {name} | {_separation(frame.score.to_numpy(), frame)} | {frame.score.std(ddof=0):.2f} |")
    lines += ["", "AUC: the chance that a random clean (or aligned: clean or near-duplicate) pair outscores a random "
              "other one. SCS draws in proportion to exp(score), so a score spread (std) well below 1 gives a "
              "selection close to uniform however good the ranking; the base CLIP score is standardised.", "",
              "![score histograms](score_histograms.png)", "", SECTIONS[5], "",
              "| subset | examples | distinct | SCS temperature | clean share | aligned share |", "|---|---|---|---|---|---|"]
    clean, aligned = set(usable.uid[usable.clean]), set(usable.uid[usable.aligned])
    for name, counts in selections.items():
        share = counts[counts.index.isin(clean)].sum() / counts.sum()
        share_aligned = counts[counts.index.isin(aligned)].sum() / counts.sum()
        temperature = json.loads((subsets / f"{name}.npy.summary.json").read_text())["temperature"]
        temperature = "" if temperature is None else f"{temperature:.3g}"
        lines.append(f"| {name} | {int(counts.sum())} | {len(counts)} | {temperature} | {share:.2f} | {share_aligned:.2f} |")
    lines += ["", "Top-k keeps a share of the usable pool; SCS draws as many examples as the pool holds, with "
              "repeats, at the temperature (found by `--unique_fraction`) that leaves the same share distinct.", "",
              "![selection by kind](selection_by_kind.png)", "", SECTIONS[6], "",
              "![training curves](training_curves.png)", "", SECTIONS[7], "",
              "Pool scored with " + "; ".join(
                  f"{label}: the best validation step's checkpoint (step {best[label]})" if best[label] is not None
                  else f"{label}: the last checkpoint (no scoring_best.pt)" for label in RUNS) + ".", "",
              *_diagnostics_table(metrics, best), "", "![diagnostics](diagnostics.png)", "",
              SECTIONS[8], "", "Every step, in order (`python -m flyt.demo.steps` runs the demo's own data and score "
              "files; the rest are `flyt` subcommands):", "", "```bash", *commands, "```", ""]
    path = root / "report" / "report.md"
    path.write_text("\n".join(lines))
    start = lines.index(SECTIONS[0])
    print("\n".join(lines[start:lines.index(SECTIONS[2])]))
    return path

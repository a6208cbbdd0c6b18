"""Typed configuration of ``flyt train``; the command-line flags are generated from these fields.

Flag names are the original FLYT ones (docs/formats.md, "Original command line"), so
``python -m flyt.train_flyt`` takes the original command lines unchanged; a few flags of ours are
marked (flyt) in their help. A field's metadata may add ``aliases`` (other flag names) and ``join``
(the flag takes several tokens, each itself possibly joined, stored as one joined string).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, get_args, get_origin, get_type_hints

from flyt.errors import FlytError
from flyt.precision import parse_precision

ADAMW_HELP = {"beta1": "AdamW beta1 (default 0.9)",  # defaults: flyt.method.optim.AdamWConfig.for_model
              "beta2": "AdamW beta2 (default, as OpenCLIP: 0.98 for ViT models, else 0.999)",
              "eps": "AdamW epsilon (default, as OpenCLIP: 1e-6 for ViT models, else 1e-8)"}
DLS_OPTIMIZERS = ("reference", "scoring")  # which optimizer updates the downstream temperature


def _f(default: Any, help: str, **kw) -> Any:
    meta = {"help": help, **kw}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # data
    upstream_data_dir: str = _f(None, "pool: a folder of shards (recursive), one .tar, or several joined by '::'", required=True)
    data_weights: str | None = _f(None, "weights of the '::' pool sources, e.g. 1::2 (per shard)")
    downstream_data_dir: str | None = _f(None, "root of the downstream tasks' training shards")
    datacomp_eval_dir: str | None = _f(None, "root of DataComp eval folders (class names and templates)")
    downstream_task_names: str = _f(None, "tasks: original names or task folders, joined by '::' or space-separated",
                                    required=True, join="::", metavar="TASK")
    downstream_data_weights: str | None = _f(None, "task weights joined by '::' (loss average; mixture for --downstream_clip_loss)")
    downstream_clip_loss: bool = _f(False, "downstream loss = CLIP loss on task image-caption pairs")
    dataset_weighted: bool = _f(False, "with --downstream_clip_loss: every task equally likely, whatever its size")
    parquet_dir: str | None = _f(None, "M-FLYT: folder of <shard>_scores.parquet input scores (several joined by '::')")
    parquet_fields: list = _f([], "M-FLYT: score columns to mix", nargs="+")
    workers: int = _f(2, "data loader processes")
    shuffle_buffer: int = _f(1000, "(flyt) samples in each stream's shuffle buffer")
    # run
    output_dir: str = _f("./runs", "where EXP_NAME/ goes")
    exp_name: str | None = _f(None, "run name (default: from the mode, model and seed)")
    seed: int = _f(0, "seed of initialisation, data order and templates")
    num_checkpoints: int = _f(1, "epochs (n_iterations / num_checkpoints steps each), a checkpoint after each")
    save_frequency: int = _f(1, "keep a numbered checkpoint every this many epochs (latest is always written)")
    resume: str | None = _f(None, "'latest' or a scoring checkpoint path of this run")
    log_every_n_steps: int = _f(10, "console/metrics line every this many steps")
    log_pre_update: bool = _f(False, "also log the downstream losses before the reference update")
    report_to_wandb: bool = _f(False, "log to Weights & Biases (honours WANDB_MODE=offline)")
    wandb_project_name: str = _f("flyt", "wandb project")
    val_every: int = _f(0, "(flyt) every this many steps, the downstream-loss gain of the learned weighting over "
                        "uniform weights on held-out task data (0: never)")
    val_batches: int = _f(1, "(flyt) held-out task batches per validation (the same ones each time)")
    val_fraction: float = _f(0.0, "(flyt) share of each task's training samples held out for --val_every, by a "
                             "hash of the sample key (default: the tasks' own val/ folders)")
    keep_best: bool = _f(False, "(flyt) with --val_every: keep the scoring model of the best gain as scoring_best.pt")
    device: str | None = _f(None, "(flyt) cpu, cuda, cuda:1 ... (default: cuda if available)")
    precision: str | None = _f(None, "fp32 | amp (fp16 autocast + loss scaling) | amp_bf16 (= amp_bfloat16) | bf16 "
                                     "(default: amp on CUDA, else fp32)")
    scaler_scale: float = _f(2.0 ** 16, "initial loss scale for --precision amp")
    # models
    model: str = _f("ViT-B-32", "OpenCLIP architecture of the reference and scoring models")
    reference_pretrained: str | None = _f(None, "OpenCLIP tag or local file for the reference model")
    scoring_pretrained: str | None = _f(None, "OpenCLIP tag or local file for the scoring model's CLIP base")
    full_scoring_pretrained: str | None = _f(None, "a scoring checkpoint to start the whole scoring model from")
    update_reference_model: bool = _f(False, "move the reference to theta' after every step")
    downstream_logit_scale: float | None = _f(None, "initial log downstream temperature, learned (e.g. 2.65926)")
    downstream_logit_scale_optimizer: str = _f(
        "reference", "(flyt) update the downstream temperature like the original, with the reference's AdamW "
        "settings and schedule (reference), or in the scoring optimizer (scoring)", choices=DLS_OPTIMIZERS)
    train_full_scoring: bool = _f(False, "train the scoring model's CLIP base too, not only its head")
    n_scoring_layers: int = _f(1, "GLU layers in the scoring head")
    hidden_dim_mod: float = _f(1.0, "GLU hidden size = int(2 * embed_dim * this)")
    cos_sim_init: bool = _f(False, "start the 1-layer head at ~ image-text cosine similarity")
    scoring_trainable: str = _f("all", "(flyt) FLYT head parameters that train: all, or output (W2 and the biases; "
                                "W1/W3 keep their start, e.g. --cos_sim_init's)", choices=("all", "output"))
    mixer_init: str = _f("zeros", "(flyt) M-FLYT mixer start: zeros (all equal) or random (the original)",
                         choices=("zeros", "random"))
    # optimisation
    reference_learning_rate: float = _f(5e-5, "peak learning rate of the reference model")
    scoring_learning_rate: float | None = _f(None, "peak learning rate of the scoring model (default: the original's "
                                             "1e-3 for python -m flyt.train_flyt; for flyt train "
                                             "1e-3 * sqrt(upstream_batch_size / 4096))")
    warmup: int = _f(100, "linear warmup steps of both cosine schedules")
    upstream_batch_size: int = _f(1024, "global upstream batch")
    downstream_batch_size: int = _f(512, "global downstream batch (per task for zero-shot)")
    n_iterations: int | None = _f(None, "training steps")
    reference_num_samples: int | None = _f(None, "instead of --n_iterations: upstream samples to train on")
    accum_freq: int = _f(1, "process each batch in this many chunks (memory; same mathematics)")
    beta1: float | None = _f(None, ADAMW_HELP["beta1"])
    beta2: float | None = _f(None, ADAMW_HELP["beta2"])
    eps: float | None = _f(None, ADAMW_HELP["eps"])

    def __post_init__(self):
        if (self.n_iterations is None) == (self.reference_num_samples is None):
            raise FlytError("give exactly one of --n_iterations and --reference_num_samples")
        if self.n_iterations is None:
            self.n_iterations = math.ceil(self.reference_num_samples / self.upstream_batch_size)
        positive = ("n_iterations", "num_checkpoints", "save_frequency", "upstream_batch_size",
                    "downstream_batch_size", "accum_freq", "log_every_n_steps", "n_scoring_layers")
        for name in positive:
            if getattr(self, name) < 1:
                raise FlytError(f"--{name} must be >= 1 (got {getattr(self, name)})")
        if self.workers < 0 or self.warmup < 0:
            raise FlytError("--workers and --warmup must be >= 0")
        if self.num_checkpoints > self.n_iterations:
            raise FlytError(f"--num_checkpoints {self.num_checkpoints} exceeds the {self.n_iterations} steps")
        if bool(self.parquet_dir) != bool(self.parquet_fields):
            raise FlytError("M-FLYT needs both --parquet_dir and --parquet_fields")
        self.precision = parse_precision(self.precision)
        if self.downstream_logit_scale_optimizer not in DLS_OPTIMIZERS:
            raise FlytError(f"--downstream_logit_scale_optimizer must be one of {', '.join(DLS_OPTIMIZERS)}, "
                            f"not {self.downstream_logit_scale_optimizer!r}")
        if self.cos_sim_init and self.mode != "flyt":
            raise FlytError("--cos_sim_init applies to a FLYT scoring model, not to M-FLYT")
        if self.scoring_trainable != "all" and (self.mode != "flyt" or self.train_full_scoring):
            raise FlytError(f"--scoring_trainable {self.scoring_trainable} applies to a FLYT head alone: "
                            "not with M-FLYT or --train_full_scoring")
        if self.val_every < 0 or self.val_batches < 1 or not 0 <= self.val_fraction < 1:
            raise FlytError(f"--val_every must be >= 0, --val_batches >= 1 and --val_fraction in [0, 1) (got "
                            f"{self.val_every}, {self.val_batches}, {self.val_fraction:g})")
        if (self.keep_best or self.val_fraction > 0) and not self.val_every:
            raise FlytError("--keep_best and --val_fraction belong to validation: give --val_every N too")

    @property
    def mode(self) -> str:
        return "mflyt" if self.parquet_dir else "flyt"

    @property
    def run_name(self) -> str:
        return self.exp_name or f"{self.mode}-{self.model}-seed{self.seed}"


# argparse help text: "%%" prints as "%"
JOB_SPLIT_HELP = "split the pool's shards over N jobs; this job takes shards j with j %% N == I"


def add_job_split_arguments(parser: argparse.ArgumentParser) -> None:
    """``--shard_index I --num_shards N``, worded the same in every command that splits a pool."""
    parser.add_argument("--shard_index", type=int, default=None, metavar="I", help=JOB_SPLIT_HELP)
    parser.add_argument("--num_shards", type=int, default=None, metavar="N", help=JOB_SPLIT_HELP)


class JoinTokens(argparse.Action):
    """Several tokens, each maybe already ``a::b``, stored as one string joined by ``separator``.

    So ``--downstream_task_names a::b`` (the original form) and ``--downstream_task_names a b`` agree.
    """

    def __init__(self, option_strings, dest, separator: str = "::", **kwargs):
        super().__init__(option_strings, dest, nargs="+", **kwargs)
        self.separator = separator

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.separator.join(values))


ORIGINAL_SCORING_LR = 1e-3  # the paper's, tuned at a global upstream batch of 4096


def batch_scaled_scoring_lr(upstream_batch_size: int) -> float:
    """``flyt train``'s default scoring lr: square-root scaling (Adam's rule) from the paper's 1e-3 at 4096.

    At small batches the paper's lr scrambles a --cos_sim_init start within tens of steps."""
    return ORIGINAL_SCORING_LR * math.sqrt(upstream_batch_size / 4096)


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--name`` flag per field (plus its ``aliases``): booleans are switches, lists take several values."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        help_text = meta.pop("help", "")
        names = [f"--{f.name}", *meta.pop("aliases", ())]
        kind = hints[f.name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if kind is bool:
            parser.add_argument(*names, dest=f.name, action="store_true", help=help_text)
            continue
        if "join" in meta:
            meta.update(action=JoinTokens, separator=meta.pop("join"))
        base = next((a for a in get_args(kind) if a is not type(None)), kind) if get_origin(kind) else kind
        if base is list:
            base = str
        parser.add_argument(*names, dest=f.name, type=base, default=default, help=help_text, **meta)


def config_from_args(cls: type, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


@dataclass
class ClipTrainConfig:
    """``flyt train-clip``: a DataComp-like CLIP recipe scaled down by flags."""

    upstream_data_dir: str = _f(None, "pool: a folder of shards, one .tar, or several joined by '::'", required=True)
    subset: str | None = _f(None, "a subset .npy from flyt sample: train on these uids, repeats honoured")
    model: str = _f("ViT-B-32", "OpenCLIP architecture")
    pretrained: str | None = _f(None, "start from this OpenCLIP tag or checkpoint file")
    output_dir: str = _f("./runs", "where EXP_NAME/checkpoints/ goes")
    exp_name: str | None = _f(None, "run name (default: clip-MODEL-seedS)")
    steps: int = _f(None, "optimizer steps", required=True)
    batch_size: int = _f(256, "global batch size")
    lr: float = _f(5e-4, "peak learning rate (cosine schedule)")
    warmup: int = _f(500, "linear warmup steps")
    wd: float = _f(0.2, "AdamW weight decay on >=2-D weights")
    beta1: float | None = _f(None, ADAMW_HELP["beta1"])
    beta2: float | None = _f(None, ADAMW_HELP["beta2"])
    eps: float | None = _f(None, ADAMW_HELP["eps"])
    seed: int = _f(0, "seed of initialisation and data order")
    workers: int = _f(2, "data loader processes")
    device: str | None = _f(None, "cpu, cuda, ... (default: cuda if available)")
    precision: str | None = _f(None, "fp32 | amp | amp_bf16 (= amp_bfloat16) | bf16 (default: amp on CUDA, else fp32)")
    log_every_n_steps: int = _f(50, "console/metrics line every this many steps")

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every_n_steps"):
            if getattr(self, name) < 1:
                raise FlytError(f"--{name} must be >= 1 (got {getattr(self, name)})")
        if self.warmup < 0 or self.workers < 0:
            raise FlytError("--warmup and --workers must be >= 0")
        self.precision = parse_precision(self.precision)

    @property
    def run_name(self) -> str:
        return self.exp_name or f"clip-{self.model}-seed{self.seed}"

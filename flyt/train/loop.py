"""The FLYT training loop: models, schedules, precision, checkpoints, resume and logging around
``bilevel.flyt_step``. Everything here is I/O and bookkeeping; the mathematics lives in ``bilevel``."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from flyt import progress
from flyt.atomic import append_whole, atomic_path, sweep_folder

from flyt.models import checkpoint
from flyt.method.bilevel import BilevelConfig, DownstreamBatch, flyt_step
from flyt.method.comm import LocalComm
from flyt.config import TrainConfig, batch_scaled_scoring_lr
from flyt.data.scores import open_scores
from flyt.data.shards import parse_sources, parse_weights
from flyt.streams.train import StreamConfig, TrainStream
from flyt.data.tasks import parse_task_names
from flyt.data.webdataset import name_damaged
from flyt.train.diagnostics import Probe, batch_diagnostics
from flyt.train.preemption import EXIT_CODE, Preempted, StopSignal, ignore_sigterm
from flyt.errors import FlytError
from flyt.models.networks import ScorerSpec, build_scorer, create_clip, image_dtype, restrict_trainable
from flyt.method.optim import AdamWConfig, AdamWState, cosine_lr, decays
from flyt.precision import autocast, resolve_device, resolve_precision
from flyt.train.validation import Validation, weighting_gain


# Non-finite steps in a row that end a run. fp16's dynamic loss scale halves on each one, so a short run of
# them is normal there while it finds its scale; 30 halvings are past any useful scale. Without it a
# non-finite step repeats for the same weights, and a few in a row mean the weights or inputs are broken.
MAX_SKIPPED_IN_A_ROW = {True: 30, False: 5}


@dataclass
class LossScale:
    """Dynamic loss scale for fp16: halve and skip the step on inf/nan, double after a run of good steps."""

    scale: float = 1.0
    dynamic: bool = False
    good_steps: int = 0
    growth_interval: int = 2000

    def update(self, finite: bool) -> None:
        if not self.dynamic:
            return
        if not finite:
            self.scale, self.good_steps = self.scale / 2, 0
        else:
            self.good_steps += 1
            if self.good_steps % self.growth_interval == 0:
                self.scale *= 2


def _epoch_start(cfg: TrainConfig, epoch: int) -> int:
    """The number of steps before ``epoch`` (epochs split ``n_iterations`` as evenly as rounding allows)."""
    return round(cfg.n_iterations * epoch / cfg.num_checkpoints)


def _per_rank(total: int, comm, accum: int, flag: str) -> int:
    per = total // comm.world_size
    if per * comm.world_size != total or per < accum:
        raise FlytError(f"{flag} {total} must divide by the {comm.world_size} process(es) and leave >= --accum_freq samples each")
    return per


class Trainer:
    def __init__(self, cfg: TrainConfig, comm=None):
        self.cfg, self.comm = cfg, comm or LocalComm()
        cfg.precision = resolve_precision(cfg.precision)  # the default (None) becomes what runs, also in config.json
        self.device = resolve_device(cfg.device, cfg.precision)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.run_dir = Path(cfg.output_dir) / cfg.run_name
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.tasks = parse_task_names(cfg.downstream_task_names, cfg.downstream_data_dir, cfg.datacomp_eval_dir)
        self.task_weights = parse_weights(cfg.downstream_data_weights, len(self.tasks), "--downstream_data_weights")
        sources = parse_sources(cfg.upstream_data_dir, cfg.data_weights)
        scores = open_scores(cfg.parquet_dir, cfg.parquet_fields) if cfg.mode == "mflyt" else None
        self.stream_cfg = StreamConfig(
            sources, self.tasks, _per_rank(cfg.upstream_batch_size, self.comm, cfg.accum_freq, "--upstream_batch_size"),
            _per_rank(cfg.downstream_batch_size, self.comm, cfg.accum_freq, "--downstream_batch_size"),
            cfg.seed, cfg.downstream_clip_loss, cfg.dataset_weighted, self.task_weights, cfg.shuffle_buffer, scores,
            self.comm.rank, self.comm.world_size, val_fraction=cfg.val_fraction)
        self.validation = Validation.create(self.stream_cfg, cfg.val_every, cfg.val_batches, cfg.val_fraction,
                                            self.comm.world_size) if cfg.val_every else None

        torch.manual_seed(cfg.seed)
        self.reference, self.preprocess, _, self.tokenizer = create_clip(
            cfg.model, cfg.reference_pretrained, self.device, cfg.precision)
        self.reference.train()
        self.spec = ScorerSpec(cfg.mode, cfg.model if cfg.mode == "flyt" else None, cfg.n_scoring_layers,
                               cfg.hidden_dim_mod, list(cfg.parquet_fields))
        self.scorer = build_scorer(self.spec, cfg.scoring_pretrained, self.device, cfg.precision,
                                   cfg.train_full_scoring, cfg.mixer_init)
        if cfg.cos_sim_init:
            self.scorer.glu_model.init_cosine_similarity(torch.Generator().manual_seed(cfg.seed))
        if cfg.full_scoring_pretrained:
            sd = checkpoint.load(cfg.full_scoring_pretrained)
            self.scorer.load_state_dict({k.removeprefix("module."): v for k, v in sd.get("state_dict", sd).items()})
        if cfg.mode == "flyt":
            restrict_trainable(self.scorer, cfg.scoring_trainable)
        if cfg.scoring_learning_rate is None:
            cfg.scoring_learning_rate = batch_scaled_scoring_lr(cfg.upstream_batch_size)
            if self.comm.rank == 0:
                progress.write(f"flyt train: --scoring_learning_rate {cfg.scoring_learning_rate:.3g} (default: 1e-3 * "
                               f"sqrt({cfg.upstream_batch_size} / 4096), square-root scaling from the paper's batch)")
        self.params = {k: v.detach() for k, v in self.reference.named_parameters()}
        self.opt_state = AdamWState.zeros_like(self.params)
        self.dls = None
        if cfg.downstream_logit_scale is not None:
            self.dls = torch.nn.Parameter(torch.tensor(cfg.downstream_logit_scale, device=self.device))
        named = [(n, p) for n, p in self.scorer.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if decays(n, p)], "weight_decay": 0.2},
                  {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}]
        adamw = AdamWConfig.for_model(cfg.model, cfg.beta1, cfg.beta2, cfg.eps)
        # the downstream temperature: like the original, its own AdamW at the reference's learning rate and
        # schedule, no decay (the reference's update is functional, so it cannot join that optimizer)
        self.dls_opt = None
        if self.dls is not None and cfg.downstream_logit_scale_optimizer == "scoring":
            groups.append({"params": [self.dls], "weight_decay": 0.0})
        elif self.dls is not None:
            self.dls_opt = torch.optim.AdamW([self.dls], lr=cfg.reference_learning_rate, betas=adamw.betas,
                                             eps=adamw.eps, weight_decay=0.0)
        self.scoring_opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.scoring_learning_rate,
                                             betas=adamw.betas, eps=adamw.eps)
        self.loss_scale = LossScale(cfg.scaler_scale, dynamic=True) if cfg.precision == "amp" else LossScale()
        self.step, self.epoch = 0, 0
        self.skipped_steps = 0
        self.skipped_causes = {}  # the streams' skipped samples (and damaged shard reads) by cause, whole run
        self.skipped_in_epochs = Counter()  # those of the finished epochs (each epoch's streams count afresh)
        self.skipped_in_a_row = 0  # steps since the last finite one; past MAX_SKIPPED_IN_A_ROW the run stops
        self.signals = StopSignal(stop_on_sigterm=False)
        self.probe: Probe | None = None
        self.bilevel = BilevelConfig(adamw, "clip" if cfg.downstream_clip_loss else "zeroshot",
                                     cfg.update_reference_model, cfg.accum_freq, precision=cfg.precision)

    # ---- checkpoints -------------------------------------------------------------------------------
    def _payloads(self) -> tuple[dict, dict]:
        dls = self.dls.detach().cpu() if self.dls is not None else None
        meta = {"scorer": self.spec.to_dict(), "step": self.step, "config": dataclasses.asdict(self.cfg),
                "loss_scale": dataclasses.asdict(self.loss_scale), "skipped_steps": self.skipped_steps,
                "skipped_in_epochs": dict(self.skipped_in_epochs),
                "skipped_in_a_row": self.skipped_in_a_row,  # a resumed run stops at the step the whole one would
                "rng": torch.get_rng_state(), "probe_initial": self.probe.initial if self.probe else None,
                "validation": self.validation.state() if self.validation else None,
                "dls_optimizer": self.dls_opt.state_dict() if self.dls_opt is not None else None}
        scoring = {"epoch": self.epoch, "name": self.cfg.run_name, "state_dict": self.scorer.state_dict(),
                   "optimizer": self.scoring_opt.state_dict(), "downstream_logit_scale": dls, "flyt": meta}
        reference = {"epoch": self.epoch, "name": self.cfg.run_name, "state_dict": self.reference.state_dict(),
                     "optimizer": self.opt_state.state_dict(), "downstream_logit_scale": dls}
        return scoring, reference

    def save(self) -> None:
        if self.comm.rank == 0:
            numbered = self.epoch % self.cfg.save_frequency == 0 or self.epoch == self.cfg.num_checkpoints
            with self.signals.deferred():
                checkpoint.save(self.ckpt_dir, self.epoch, *self._payloads(), numbered)

    def maybe_resume(self) -> bool:
        if not self.cfg.resume:
            return False
        point = checkpoint.resume_point(self.ckpt_dir, self.cfg.resume)
        if point is None:
            return False
        path, scoring, reference = point
        self.scorer.load_state_dict(scoring["state_dict"])
        self.scoring_opt.load_state_dict(scoring["optimizer"])
        saved = scoring["flyt"].get("dls_optimizer")
        if (saved is None) != (self.dls_opt is None):
            raise FlytError(f"--resume {path}: written with other --downstream_logit_scale(_optimizer) flags; "
                            "resume with the run's own flags")
        if self.dls_opt is not None:
            self.dls_opt.load_state_dict(saved)
        with torch.no_grad():
            self.reference.load_state_dict(reference["state_dict"])
            if self.dls is not None:
                self.dls.copy_(scoring["downstream_logit_scale"])
        self.params = {k: v.detach() for k, v in self.reference.named_parameters()}
        state = AdamWState.from_state_dict(reference["optimizer"])
        self.opt_state = AdamWState(state.step, {k: v.to(self.device) for k, v in state.exp_avg.items()},
                                    {k: v.to(self.device) for k, v in state.exp_avg_sq.items()})
        meta = scoring["flyt"]
        self.epoch, self.step, self.skipped_steps = scoring["epoch"], meta["step"], meta["skipped_steps"]
        self.skipped_in_epochs = Counter(meta.get("skipped_in_epochs", {}))
        self.skipped_in_a_row = meta.get("skipped_in_a_row", 0)  # not in the checkpoints of earlier versions
        self.loss_scale = LossScale(**meta["loss_scale"])
        torch.set_rng_state(meta["rng"])
        self.probe = Probe(self._probe_batch(), meta.get("probe_initial"))
        if self.validation:
            self.validation.load_state(meta.get("validation"))
        return True

    # ---- diagnostics -------------------------------------------------------------------------------
    def _probe_batch(self, size: int = 256) -> dict:
        """The first ``size`` samples of this rank's first upstream batch: the seed reproduces them on resume."""
        with torch.random.fork_rng(devices=[]):  # the stream seeds torch for its crops: keep the run's RNG
            batch = next(iter(TrainStream(self.stream_cfg, 0, self.preprocess, self.tokenizer)))["upstream"]
        return {k: v[:size] for k, v in batch.items()}

    @torch.no_grad()
    def _scores(self, up: dict) -> torch.Tensor:
        with autocast(self.cfg.precision, self.device):
            return self.scorer(self._to_device({"upstream": up, "downstream": []})[0]).float()

    def _diagnostics(self, scores: torch.Tensor) -> dict:
        """Spread and ESS of the step's global batch (its scores, as the step computed them), rank correlation
        with the start on the probe (one no_grad scorer forward, on log steps only, before the scorer's update)."""
        probe_scores = self.comm.gather(self.probe.scores(self._scores)).cpu()
        return dict(batch_diagnostics(scores.float().cpu()),
                    **{"diag/probe_spearman": self.probe.drift(probe_scores)})

    def _validate(self, bundle: dict) -> dict:
        """The gain of the learned weighting over uniform from the current state, on the step's upstream batch."""
        cfg = self.cfg
        held_out = [self._tasks_to_device(b["downstream"])
                    for b in self.validation.batches(self.preprocess, self.tokenizer)]
        lr = cosine_lr(cfg.reference_learning_rate, cfg.warmup, cfg.n_iterations, max(self.step - 1, 0))  # the step's
        metrics = weighting_gain(self.reference, self.params, self.opt_state, lr, self._to_device(bundle)[0],
                                 self._scores(bundle["upstream"]), held_out, self.dls,
                                 dataclasses.replace(self.bilevel, loss_scale=self.loss_scale.scale))
        if self.validation.record(metrics["val/gain"], self.step) and cfg.keep_best:
            checkpoint.save_best(self.ckpt_dir, self._payloads()[0])
        return dict(metrics, step=self.step)

    def _logs(self, step: int) -> bool:
        return step % self.cfg.log_every_n_steps == 0 or step == self.cfg.n_iterations

    # ---- one step ----------------------------------------------------------------------------------
    def _to_device(self, bundle: dict) -> tuple[dict, list[DownstreamBatch]]:
        up = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in bundle["upstream"].items()}
        up["image"] = up["image"].to(image_dtype(self.reference))
        return up, self._tasks_to_device(bundle["downstream"])

    def _tasks_to_device(self, downstream: list[dict]) -> list[DownstreamBatch]:
        dtype = image_dtype(self.reference)
        tasks = []
        for i, t in enumerate(downstream):
            move = lambda x: x.to(self.device) if x is not None else None
            weight = self.task_weights[i] if self.task_weights and not self.cfg.downstream_clip_loss else 1.0
            tasks.append(DownstreamBatch(t["name"], t["images"].to(self.device, dtype), move(t.get("labels")),
                                         move(t.get("prompts")), move(t.get("texts")), weight))
        return tasks

    def train_step(self, bundle: dict) -> dict:
        cfg = self.cfg
        ref_lr = cosine_lr(cfg.reference_learning_rate, cfg.warmup, cfg.n_iterations, self.step)
        scoring_lr = cosine_lr(cfg.scoring_learning_rate, cfg.warmup, cfg.n_iterations, self.step)
        for group in self.scoring_opt.param_groups:
            group["lr"] = scoring_lr
        optimizers = [self.scoring_opt] + ([self.dls_opt] if self.dls_opt is not None else [])
        if self.dls_opt is not None:
            self.dls_opt.param_groups[0]["lr"] = ref_lr
        up, tasks = self._to_device(bundle)
        step_cfg = dataclasses.replace(self.bilevel, loss_scale=self.loss_scale.scale, log_pre_update=cfg.log_pre_update)
        result = flyt_step(self.reference, self.params, self.opt_state, ref_lr, self.scorer, up, tasks,
                           self.dls, step_cfg, self.comm)
        diagnostics = self._diagnostics(result.scores) if self._logs(self.step + 1) else {}
        if result.finite:
            for opt in optimizers:
                opt.step()
            with torch.no_grad():  # the module holds theta: copy in place, no second copy of the weights
                for k, p in self.reference.named_parameters():
                    p.copy_(result.params[k])
            self.opt_state = result.opt_state
        else:
            self.skipped_steps += 1
            progress.write(f"step {self.step + 1}: non-finite gradients at loss scale {self.loss_scale.scale:g}: "
                           "step skipped")  # numbered from 1, as the metrics log does
        self.skipped_in_a_row = 0 if result.finite else self.skipped_in_a_row + 1
        limit = MAX_SKIPPED_IN_A_ROW[self.loss_scale.dynamic]
        if self.skipped_in_a_row >= limit:
            raise FlytError(
                f"steps {self.step - limit + 2}-{self.step + 1}: all {limit} had a non-finite loss or gradient "
                f"(--precision {self.cfg.precision}, loss scale {self.loss_scale.scale:g}), so the run stops here rather "
                "than spin; lower --scoring_learning_rate/--reference_learning_rate or check the input scores"
                + ("" if self.cfg.precision == "fp32" else ", or try --precision fp32"))
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        self.loss_scale.update(result.finite)
        self.step += 1
        metrics = dict(result.metrics, step=self.step, reference_lr=ref_lr, scoring_lr=scoring_lr,
                       skipped_steps=self.skipped_steps, **diagnostics)
        if self.dls is not None:
            metrics["downstream_logit_scale"] = float(self.dls.detach().exp())
        if self.spec.mode == "mflyt":
            weight = self.scorer.layers[0].weight.detach().flatten().tolist()
            metrics.update({f"mixer/{f}": w for f, w in zip(self.spec.parquet_fields, weight)})
        return metrics

    # ---- the loop ----------------------------------------------------------------------------------
    def fit(self, stop_on_sigterm: bool = False) -> dict:
        """Train to the end; with ``stop_on_sigterm``, a SIGTERM ends the run after the step in flight with
        a checkpoint of it and ``Preempted`` (``flyt train`` exits with ``EXIT_CODE``)."""
        cfg = self.cfg
        self.signals = StopSignal(stop_on_sigterm)
        with self.signals:
            if self.comm.rank == 0:  # what a kill in a write left (metrics, config, checkpoints)
                sweep_folder(self.run_dir, self.ckpt_dir)  # only rank 0 writes there
            resumed = self.maybe_resume()
            if self.probe is None:  # scored now, by the starting scorer
                self.probe = Probe(self._probe_batch())
                self.probe.drift(self.comm.gather(self.probe.scores(self._scores)).cpu())
            logger = MetricsLog(self.run_dir, cfg, self.step, enabled=self.comm.rank == 0, resumed=resumed)
            start = time.time()
            try:
                with progress.bar(total=cfg.n_iterations, initial=self.step, desc=f"flyt train ({cfg.mode})",
                                  unit="step", disable=self.comm.rank != 0) as bar:
                    last = self._epochs(bar, logger)
            finally:
                logger.close()
        return {"run_dir": str(self.run_dir), "steps": self.step, "seconds": round(time.time() - start, 1),
                "skipped_steps": self.skipped_steps, "skipped_samples": last.get("skipped_samples", 0),
                "skipped": self.skipped_causes,
                "final": {k: v for k, v in last.items() if "loss" in k or k.startswith("mixer/")},
                **({"val_best": self.validation.state()} if self.validation else {})}

    def _epochs(self, bar, logger) -> dict:
        cfg, last = self.cfg, {}
        while self.epoch < cfg.num_checkpoints:
            skipped_samples = {}  # worker -> its stream's counts so far: each epoch's streams count afresh
            # the loader's own generator: drawing its base seed must not move the run's RNG, which a
            # checkpoint in mid-epoch saves and a resumed run (drawing it again) restores
            loader = torch.utils.data.DataLoader(TrainStream(self.stream_cfg, self.epoch, self.preprocess, self.tokenizer),
                                                 batch_size=None, num_workers=cfg.workers,
                                                 generator=torch.Generator(), worker_init_fn=ignore_sigterm)
            batches = iter(loader)
            start, end = _epoch_start(cfg, self.epoch), _epoch_start(cfg, self.epoch + 1)
            # resumed in mid-epoch: replay the seeded stream to its position. Its steps are decoded and
            # dropped, not skipped unread: which samples fail to decode, and the crops' random draws
            # (which depend on each image's size), are only known by decoding
            for _ in range(self.step - start):
                bundle = next(batches)
                skipped_samples[bundle["worker"]] = bundle["skipped"]
                name_damaged(bundle["damaged"])  # the workers' damaged shards, named here once per run
            stop = False
            while self.step < end and not stop:
                tick = time.time()
                bundle = next(batches)
                skipped_samples[bundle["worker"]] = bundle["skipped"]
                name_damaged(bundle["damaged"])
                last = self.train_step(bundle)
                last["samples_per_s"] = cfg.upstream_batch_size / max(time.time() - tick, 1e-9)
                self.skipped_causes = dict(sorted(sum(map(Counter, skipped_samples.values()),
                                                      Counter(self.skipped_in_epochs)).items()))
                last["skipped_samples"] = sum(self.skipped_causes.values())
                bar.update(1)
                if self._logs(self.step):
                    logger.log(last)
                if self.validation and self.validation.due(self.step, cfg.n_iterations):
                    logger.log(self._validate(bundle))
                stop = self.step < cfg.n_iterations and self._stop_requested()
            del batches, loader
            if self.step == end:
                self.epoch += 1
                self.skipped_in_epochs = Counter(self.skipped_causes)
                self.save()
            if stop:
                self._preempted(end)
        return last

    def _stop_requested(self) -> bool:
        """Whether any rank got SIGTERM: asked by every rank after every step, so all stop at the same one."""
        flag = torch.tensor([float(self.signals.received is not None)], device=self.device)
        self.comm.all_reduce_sum([flag])
        return bool(flag.item())

    def _preempted(self, epoch_end: int) -> None:
        """Save the step (in mid-epoch; at an epoch's end its pair is already written), say so, stop."""
        tick, cfg = time.time(), self.cfg
        if self.comm.rank == 0:
            if self.step < epoch_end:
                with self.signals.deferred():
                    written = checkpoint.save_preempted(self.ckpt_dir, *self._payloads())
            else:
                written = self.ckpt_dir / checkpoint.SCORING.format("latest")
            progress.write(f"flyt train: {self.signals.received or 'a stop signal on another rank'} after step "
                           f"{self.step} of {cfg.n_iterations}: {written} written in {time.time() - tick:.1f} s; "
                           f"rerun with --resume latest to continue (exit code {EXIT_CODE})")
        self.comm.all_reduce_sum([torch.zeros(1, device=self.device)])  # no rank leaves before the file exists
        raise Preempted(f"stopped after step {self.step}")


class MetricsLog:
    """Console lines, ``metrics.jsonl`` in the run folder, and wandb when asked."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, step: int, enabled: bool, resumed: bool):
        self.enabled, self.wandb = enabled, None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(run_dir / "config.json") as tmp:  # a kill in a rewrite must not truncate either file
            tmp.write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        self.path = run_dir / "metrics.jsonl"
        kept = [line for line in _complete_lines(self.path) if json.loads(line)["step"] <= step] if resumed else []
        with atomic_path(self.path) as tmp:  # drop lines a killed run wrote after its last checkpoint
            tmp.write_text("".join(line + "\n" for line in kept))
        if cfg.report_to_wandb:
            try:
                import wandb
            except ImportError:
                raise FlytError("--report_to_wandb needs wandb: pip install 'flyt[wandb]'") from None
            self.wandb = wandb.init(project=cfg.wandb_project_name, name=cfg.run_name, dir=str(run_dir),
                                    config=dataclasses.asdict(cfg), resume="allow")

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        append_whole(self.path, json.dumps(metrics) + "\n")
        shown = " ".join(f"{k.split('/')[-1] if k.startswith('downstream_loss/') else k}={v:.4g}"
                         for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v))
        progress.write(f"step {metrics['step']}: {shown}")
        if self.wandb is not None:
            self.wandb.log(metrics, step=metrics["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _complete_lines(path: Path) -> list[str]:
    """The log's lines, less a last one that a kill cut short in mid-append (no newline yet); a damaged line
    before it is not a kill's doing and stops the resume naming the file."""
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").split("\n")[:-1]  # what follows the last newline is dropped
    for number, line in enumerate(lines, 1):
        try:
            json.loads(line)["step"]
        except (ValueError, TypeError, KeyError):
            raise FlytError(f"{path}: line {number} is not a metrics record; move the file away to resume") from None
    return lines

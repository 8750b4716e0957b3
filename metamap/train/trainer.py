"""The one trainer: meta-batches in, optimizer steps out, for every learner family.

It owns the loop, the learning-rate schedule, logging, validation, checkpoints, resume,
the divergence guard, clean stops on SIGINT/SIGTERM and gradient all-reduce across
torch.distributed ranks. Learners only provide their meta-gradient (``meta_backward``, by
default the gradient of ``meta_loss``).
"""
from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from metamap.algorithms.base import MetaGradient, MetaLearner
from metamap.config import OptimOptions
from metamap.data.paths import atomic_write
from metamap.errors import CheckpointError, DivergenceError, MetamapError
from metamap.metrics_log import read_log
from metamap.tasks.batch import TaskBatch
from metamap.tasks.sampler import TaskSampler
from metamap.train import checkpoint
from metamap.train.evaluate import EvalResult
from metamap.train.precision import autocast, resolve_precision
from metamap.train.progress import progress_bar
from metamap.train.schedule import lr_factor


class Callback(Protocol):
    """Any of these methods (see :mod:`metamap.train.callbacks`); a callback may lack some."""

    def on_step(self, trainer: Trainer, record: dict) -> None: ...
    def on_validation(self, trainer: Trainer, result: EvalResult, is_best: bool) -> None: ...
    def on_fit_end(self, trainer: Trainer) -> None: ...


class TrainingInterrupted(MetamapError):
    """SIGINT or SIGTERM arrived; the step in flight finished and a checkpoint was written."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def memory_use(device: torch.device) -> dict[str, float]:
    """Resident memory now and at its peak (MB), and the CUDA peak of the last step where there is one."""
    import resource
    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    try:
        with open("/proc/self/statm") as f:
            out["rss_mb"] = round(int(f.read().split()[1]) * resource.getpagesize() / 2**20, 1)
    except OSError:
        pass
    if device.type == "cuda":
        out["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        torch.cuda.reset_peak_memory_stats(device)
    return out


def build_optimizer(params, cfg: dict) -> torch.optim.Optimizer:
    """The outer optimizer of an ``[optim]`` section (checked by :class:`~metamap.config.OptimOptions`)."""
    o = OptimOptions.from_section(cfg)
    kw = {"lr": o.lr, "weight_decay": o.weight_decay}
    if o.name == "adam":
        return torch.optim.Adam(params, **kw)
    if o.name == "adamw":
        return torch.optim.AdamW(params, **kw)
    return torch.optim.SGD(params, momentum=o.momentum, nesterov=o.nesterov, **kw)


# What a checkpoint cannot be resumed as: another model, data set or optimizer.
SAME_RUN_KEYS = (("learner", "name"), ("model", "backbone"), ("data", "name"), ("optim", "name"))


def check_same_run(meta: dict, config: dict, path: Path) -> None:
    """Refuse to resume the checkpoint described by ``meta`` under a ``config`` of another kind."""
    saved = meta.get("config")
    if not isinstance(saved, dict):
        saved = {"learner": {"name": meta.get("learner", config["learner"]["name"])}}
    for section, key in SAME_RUN_KEYS:
        was, now = saved.get(section, {}).get(key), config.get(section, {}).get(key)
        if was is not None and was != now:
            raise CheckpointError(
                f"{path} was trained with {section}.{key} = {was!r}; it cannot be resumed with "
                f"{section}.{key} = {now!r}. Resume without changing it, or start a new run (another --run-dir)")


def prefetching(train_cfg: dict, device) -> bool:
    """Whether the next batch is drawn while this one trains (``train.prefetch``; auto = on CUDA)."""
    prefetch = train_cfg["prefetch"]
    return torch.device(device).type == "cuda" if prefetch == "auto" else bool(prefetch)


class Trainer:
    """Meta-trains ``learner`` on ``sampler`` for ``config['train']['steps']`` meta-batches.

    ``validate`` (optional) returns an :class:`EvalResult` on fixed validation episodes; the
    best one is kept in ``RUN/best``, the latest state in ``RUN/last``. ``meta`` is stored in
    every checkpoint (the config and data info needed to rebuild the learner).
    """

    def __init__(self, learner: MetaLearner, sampler: TaskSampler, config: dict, run_dir: str | Path,
                 meta: dict, validate: Callable[[], EvalResult] | None = None,
                 device: torch.device | str = "cpu", memory_format=None, progress: bool = True,
                 callbacks: list[Callback] = (), rank: int = 0, world_size: int = 1):
        self.learner, self.sampler, self.config, self.meta = learner, sampler, config, meta
        self.train_cfg, self.run_dir = config["train"], Path(run_dir)
        self.validate, self.device, self.memory_format = validate, torch.device(device), memory_format
        self.progress, self.callbacks, self.rank, self.world_size = progress, list(callbacks), rank, world_size
        self.optimizer = build_optimizer([p for p in learner.parameters() if p.requires_grad], config["optim"])
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.precision, self.precision_reason = resolve_precision(self.train_cfg["precision"], self.device, learner)
        if self.precision == "fp16" and self.device.type != "cuda":
            raise MetamapError("train.precision = fp16 needs a CUDA device; on CPU use bf16")
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        prefetch = prefetching(self.train_cfg, self.device)
        self._prefetch = ThreadPoolExecutor(1, thread_name_prefix="metamap-prefetch") if prefetch else None
        self._pending = None
        # The progress bar shows the kind's metrics and the extra training statistics it names.
        self.metric_names = [m.name for m in sampler.kind.metrics] + list(sampler.kind.progress)
        self.step = 0
        self.best: dict | None = None          # {"step", "metric", "mean", "higher_is_better"}
        self.bad_steps = 0
        self.saved_step: int | None = None     # step of the latest checkpoint in RUN/last
        self.reference_norm: float | None = None   # weight norm at step 0 (for train.max_weight_growth)
        self._stop_signal: int | None = None
        self.stop_reason: str | None = None    # set by request_stop (a callback ending training early)

    # -- state ---------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def checkpoint_meta(self) -> dict:
        return {**self.meta, "step": self.step, "best": self.best, "bad_steps": self.bad_steps,
                "reference_norm": self.reference_norm}

    def save(self, name: str) -> Path:
        path = checkpoint.save(self.run_dir / name, self.learner, self.checkpoint_meta(), self.optimizer)
        if name == "last":
            self.saved_step = self.step
        return path

    def resume(self, path: str | Path) -> None:
        """Continue from a checkpoint written by :meth:`save`: weights, optimizer, RNG, counters."""
        path, meta = checkpoint.read_meta(path)
        self._check_same_run(meta, path)
        checkpoint.load_state(self.learner, checkpoint.read_tensors(path, checkpoint.WEIGHTS, meta), path)
        training = checkpoint.read_tensors(path, checkpoint.TRAINING, meta)
        if "optimizer" in meta:
            self._load_optimizer(training, meta["optimizer"], path)
        if "rng.torch" in training:
            try:
                torch.set_rng_state(training["rng.torch"])
            except (RuntimeError, TypeError) as e:
                raise CheckpointError(f"{path}: its random number generator state is unusable ({e})") from None
        self.step, self.best, self.bad_steps = meta["step"], meta.get("best"), meta.get("bad_steps", 0)
        self.saved_step = self.step
        norm = meta.get("reference_norm")
        self.reference_norm = float(norm) if isinstance(norm, (int, float)) and math.isfinite(norm) else None
        self._truncate_log()

    def _check_same_run(self, meta: dict, path: Path) -> None:
        check_same_run(meta, self.config, path)

    def _load_optimizer(self, training: dict, meta: dict, path: Path) -> None:
        # The config's hyper-parameters hold after a resume (config.toml says what the run uses); the
        # checkpoint brings the moments and step counts.
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        state = checkpoint.unflatten_optimizer(training, meta, path)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # PyTorch gives the state of the j-th id listed in the saved groups to the j-th parameter.
        ids = [i for g in state["param_groups"]
               for i in (g.get("params") if isinstance(g.get("params"), list) else [None])]
        if len(ids) != len(params) or not all(type(i) is int for i in ids) or len(set(ids)) != len(ids):
            raise CheckpointError(f"{path}: its optimizer state lists {len(ids)} parameters ({ids[:6]}...) where this "
                                  f"model has {len(params)} distinct ones; it was made for another configuration")
        owner = dict(zip(ids, params))
        for idx, entries in state["state"].items():
            wrong = idx not in owner or any(torch.is_tensor(v) and v.dim() > 0 and v.shape != owner[idx].shape
                                            for v in entries.values())
            if wrong:
                raise CheckpointError(f"{path}: its optimizer state does not fit this model (parameter {idx}); "
                                      "it was made for another configuration")
        try:
            self.optimizer.load_state_dict(state)
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"{path}: its optimizer state does not fit this optimizer ({e}); resume "
                                  "with the optimizer settings it was trained with") from None
        for group, h in zip(self.optimizer.param_groups, hyper):
            group.update(h)

    def _truncate_log(self) -> None:
        # Records past the checkpoint were made by the run that died; the resumed run redoes them.
        log = self.run_dir / "metrics.jsonl"
        if self.is_main and log.exists():
            keep = [line for line, record in read_log(log) if record["step"] <= self.step]
            with atomic_write(log) as f:
                f.write("".join(line + "\n" for line in keep).encode())

    def log(self, record: dict) -> None:
        if self.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def request_stop(self, reason: str) -> None:
        """End training after the current step (as at the last step: checkpoints are written)."""
        if self.world_size > 1:
            # Every rank would have to stop at the same step; only single-process training can.
            raise MetamapError("request_stop: stopping early works in single-process training only")
        self.stop_reason = str(reason)

    def _call(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            method = getattr(cb, hook, None)
            if method is not None:
                method(self, *args)

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> dict | None:
        steps = self.train_cfg["steps"]
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        old_handlers = self._install_signal_handlers()
        bar = progress_bar(total=steps, desc="meta-train", enabled=self.progress and self.is_main, unit="batch")
        bar.update(self.step)
        tasks_done, t0 = 0, time.perf_counter()
        try:
            while self.step < steps and self.stop_reason is None:
                record = self.train_step()
                tasks_done += self.sampler.tasks_per_batch
                if record is not None:
                    elapsed = time.perf_counter() - t0
                    record["tasks_per_s"], record["elapsed_s"] = tasks_done / elapsed, round(elapsed, 4)
                    if self.step % self.train_cfg["log_every"] == 0 or self.step == steps:
                        self.log(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", **{k: f"{v:.3f}" for k, v in record.items()
                                                                    if k in self.metric_names},
                                    tasks_s=f"{record['tasks_per_s']:.1f}", refresh=False)
                    self._call("on_step", record)
                bar.update(1)
                every = self.train_cfg["val_every"]
                if self.validate is not None and every and (self.step % every == 0 or self.step == steps):
                    self.run_validation()
                end = self.step == steps or self.stop_reason is not None
                if self.is_main and (self.step % self.train_cfg["checkpoint_every"] == 0 or end):
                    self.save("last")
                if self._stop_signal is not None:
                    if self.is_main:
                        self.save("last")
                    raise TrainingInterrupted(
                        f"stopped by signal {signal.Signals(self._stop_signal).name} after step {self.step}; "
                        f"resume with: metamap train --resume {self.run_dir}", self._stop_signal)
        finally:
            bar.close()
            self._restore_signal_handlers(old_handlers)
            if self._prefetch is not None:
                self._prefetch.shutdown(wait=True, cancel_futures=True)
                self._prefetch = None
        if self.is_main and (self.validate is None or not self.train_cfg["val_every"]):
            self.best = {"step": self.step, "metric": None, "mean": None}
            self.save("best")
        self._call("on_fit_end")
        return self.best

    def train_step(self) -> dict | None:
        """One meta-batch. Returns its log record, or ``None`` if it was skipped as non-finite."""
        index = self.step
        if self.reference_norm is None:
            self.reference_norm = self.weight_norm()
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * lr_factor(index, self.train_cfg["steps"], self.config["schedule"], base)
        self.learner.train()
        # A task kind whose support data the current learner collects (trajectories) does it here.
        batch = self.sampler.kind.collect(self._batch(index), self.learner)
        self.optimizer.zero_grad(set_to_none=True)
        # Running statistics change in the forward pass; a skipped batch must not leave them changed.
        buffers = [b.clone() for b in self.learner.buffers()]
        loss, metrics = self._forward_backward(batch)
        ok = self._all_ok(bool(torch.isfinite(loss)) and self._buffers_finite())
        if ok:
            self._all_reduce_gradients(batch.num_tasks)   # a NaN on any rank reaches every rank here
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            ok = self._gradients_finite()
            if not ok and self.scaler is not None:
                # fp16 overflow: the scaler lowers its scale; not a divergence of the model.
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self._restore(buffers)
                self.step += 1
                return None
        if not ok:
            self._restore(buffers)
            return self._skip(index, float(loss.detach()))
        clip = self.config["optim"]["grad_clip"]
        if clip:
            torch.nn.utils.clip_grad_norm_(self.learner.parameters(), clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.learner.after_step()
        self._check_weights(index)
        if self.world_size > 1:
            from metamap.train.distributed import average_buffers
            average_buffers(self.learner)
        self.step += 1
        return {"step": self.step, "loss": float(loss), **metrics, "lr": self.optimizer.param_groups[0]["lr"],
                **memory_use(self.device)}

    def _forward_backward(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        """Mean loss over the batch's tasks; the learner's meta-gradient, accumulated chunk by chunk.

        With ``train.chunk_tasks = c`` the meta-batch runs ``c`` tasks at a time: each chunk's
        meta-gradient is weighted by its share of the tasks, so the accumulated gradient equals
        the whole batch's (per-task losses are independent), in a fraction of the memory.
        ``"auto"`` asks the learner (``preferred_chunk``); 0 is the whole meta-batch.
        """
        n = batch.num_tasks
        chunk = self.train_cfg["chunk_tasks"]
        size = (self.learner.preferred_chunk() if chunk == "auto" else chunk) or n
        total, metrics = torch.zeros((), dtype=torch.float64), {}
        for start in range(0, n, size):
            part = batch.slice(start, start + size)
            weight = part.num_tasks / n
            with self._autocast():
                loss, m = self.learner.meta_backward(part, MetaGradient(weight, self.scaler, self.optimizer))
            total = total + (loss.detach().float() * weight).cpu()
            for k, v in m.items():
                metrics[k] = metrics.get(k, 0.0) + weight * v
        return total, metrics

    def _autocast(self):
        return autocast(self.precision, self.device)

    def _batch(self, index: int) -> TaskBatch:
        """Batch ``index``, on the device; drawn in a background thread one step ahead if prefetching."""
        if self._prefetch is not None:
            pending, self._pending = self._pending, None
            batch = pending.result() if pending is not None and pending.index == index else self._load(index)
            if index + 1 < self.train_cfg["steps"]:
                self._pending = self._prefetch.submit(self._load, index + 1)
                self._pending.index = index + 1
            return batch
        return self._load(index)

    def _load(self, index: int) -> TaskBatch:
        batch = self.sampler.batch(index, self.rank, self.world_size)
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        return batch.to(self.device, memory_format=self.memory_format, non_blocking=self.device.type == "cuda")

    def _restore(self, buffers: list[Tensor]) -> None:
        with torch.no_grad():
            for b, saved in zip(self.learner.buffers(), buffers):
                b.copy_(saved)

    def run_validation(self) -> EvalResult:
        result = self.validate()
        better = result.better_than(None if self.best is None else self.best.get("mean"))
        if better:
            self.best = {"step": self.step, "metric": result.metric, "mean": result.mean,
                         "higher_is_better": result.higher_is_better}
        # Logged first: a kill after best/ is written must not lose the record of why.
        self.log({"step": self.step, "val_" + result.metric: result.mean, "val_ci95": result.ci95,
                  "val_setting": result.setting, "val_metric": result.metric,
                  "higher_is_better": result.higher_is_better, "best": better})
        if better and self.is_main:
            self.save("best")
        self._call("on_validation", result, better)
        return result

    # -- guards --------------------------------------------------------------------------------
    def _gradients_finite(self) -> bool:
        return all(bool(torch.isfinite(p.grad).all()) for p in self.learner.parameters() if p.grad is not None)

    def _buffers_finite(self) -> bool:
        # Running statistics change in the forward pass: a batch that makes them non-finite is skipped.
        return all(bool(torch.isfinite(b).all()) for b in self.learner.buffers() if b.is_floating_point())

    def weight_norm(self) -> float:
        params = [p.detach() for p in self.learner.parameters()]
        return float(torch.nn.utils.get_total_norm(params)) if params else 0.0

    def _check_weights(self, index: int) -> None:
        """After an update: non-finite or exploding weights stop the run at once (nothing is saved)."""
        norm = self.weight_norm()
        limit = self.train_cfg["max_weight_growth"]
        reference = max(self.reference_norm, 1.0)
        if math.isfinite(norm) and (not limit or norm <= limit * reference):
            return
        if math.isfinite(norm):
            what = (f"the weights' norm grew to {norm:.3g}, {norm / reference:.3g} times its {reference:.3g} at the "
                    f"start (limit train.max_weight_growth = {limit:g})")
        else:
            bad = [n for n, p in self.learner.named_parameters() if not bool(torch.isfinite(p).all())]
            what = (f"the update made {', '.join(bad[:3]) or 'the weights'}{' ...' if len(bad) > 3 else ''} "
                    "non-finite (NaN or infinite)")
        raise DivergenceError(
            f"training diverged at batch {index}: {what}, with optim.lr = {self.config['optim']['lr']:g}. "
            f"Nothing of it was saved; {self._last_good()}")

    def _last_good(self) -> str:
        """Where the run stands after a divergence, and what to do."""
        if self.saved_step is None:
            return (f"no checkpoint had been written yet. Lower optim.lr or set optim.grad_clip and start "
                    f"again (delete {self.run_dir} or choose another --run-dir).")
        return (f"the last good checkpoint is {self.run_dir / 'last'} (step {self.saved_step}). Lower optim.lr "
                f"or set optim.grad_clip, then resume from it: metamap train --resume {self.run_dir} --lr ...")

    def _all_ok(self, ok: bool) -> bool:
        # Every rank must agree to skip a step, or their weights would drift apart.
        if self.world_size == 1:
            return ok
        import torch.distributed as dist
        flag = torch.tensor([0.0 if ok else 1.0])
        dist.all_reduce(flag)
        return bool(flag.item() == 0)

    def _skip(self, index: int, loss: float) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        first = self.step == 0
        self.bad_steps += 1
        limit = self.train_cfg["max_bad_steps"]
        self.log({"step": self.step, "event": "non-finite", "batch_index": index, "loss": loss if math.isfinite(loss)
                  else str(loss), "bad_steps": self.bad_steps})
        # The batch index is skipped for good (its episodes are logged above), so a run does not
        # retry the same bad batch forever.
        self.step += 1
        if first:
            # At its initial weights the model already gives NaN: no later batch will do better.
            raise DivergenceError(
                f"the first meta-batch gave a non-finite loss, gradient or running statistic (loss {loss}) at "
                "the initial weights, before any update: a learner option or the data makes every step NaN "
                "(check e.g. learner.inner_lr, optim.lr and the inputs). Nothing was saved.")
        if self.bad_steps > limit:
            raise DivergenceError(
                f"training diverged: {self.bad_steps} meta-batches gave a non-finite loss, gradient or running "
                f"statistic (limit train.max_bad_steps = {limit}; the last was batch {index}). The weights were "
                f"not updated by those batches; {self._last_good()}")
        return None

    def _all_reduce_gradients(self, local_tasks: int) -> None:
        if self.world_size > 1:
            from metamap.train.distributed import all_reduce_weighted_gradients
            all_reduce_weighted_gradients(self.learner, local_tasks / self.sampler.tasks_per_batch)

    # -- signals -------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> dict:
        import threading
        if threading.current_thread() is not threading.main_thread():
            return {}
        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)
        return old

    def _on_signal(self, signum, frame) -> None:
        if self._stop_signal is not None:      # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self._stop_signal = signum

    @staticmethod
    def _restore_signal_handlers(old: dict) -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)

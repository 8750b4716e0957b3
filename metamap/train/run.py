"""From a resolved config to a trained, evaluated checkpoint: what ``metamap train``/``eval`` do."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from metamap import config as configlib
from metamap.data.memory import check_fits, check_model_fits, graph_bytes_per_example, input_bytes
from metamap.data.paths import check_writable_dir, write_text
from metamap.errors import CheckpointError, ConfigError, EpisodeError, OutputError
from metamap.registry import DataInfo, build_learner, data_source
from metamap.report import plot_curves, write_report
from metamap.train import checkpoint, eval_overrides
from metamap.train.evaluate import EvalResult, check_eval_memory, evaluate
from metamap.train.precision import resolve_precision
from metamap.train import test_time
from metamap.train.runtime import pick_device, set_threads, tune_allocator
from metamap.train.trainer import Trainer, prefetching


LOCK = ".lock"


def info_to_dict(info: DataInfo) -> dict:
    d = asdict(info)
    d["spec"] = info.spec.to_dict() if info.spec is not None else None
    d["example_shape"] = list(info.example_shape)
    return d


def memory_format_for(config: dict, info: DataInfo):
    images = len(info.example_shape) == 3
    return torch.channels_last if images and config["train"]["channels_last"] else None


def eval_settings(config: dict) -> list[tuple[int, int]]:
    as_list = lambda v: v if isinstance(v, list) else [v]
    return [(w, s) for w in as_list(config["eval"]["ways"]) for s in as_list(config["eval"]["shots"])]


def setup_runtime(config: dict) -> torch.device:
    set_threads(config["train"]["threads"])
    if config["train"]["tune_allocator"]:
        tune_allocator()
    return pick_device(config["train"]["device"])


def build(config: dict, seed_offset: int = 0):
    """The data source, its info and a freshly initialised learner (weights from ``config['seed']``)."""
    source = data_source(config)
    info = source.info(config)
    check_model_fits(lambda: build_learner(config, info), f"the {config['learner']['name']} learner")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config["seed"] + seed_offset)
        learner = build_learner(config, info)
    return source, info, learner


def trainer_share(tasks_per_batch: int, world_size: int) -> int:
    return -(-tasks_per_batch // world_size)


def check_step_memory(learner, info: DataInfo, config: dict, tasks: int, examples_per_task: int | None = None,
                      prefetch: bool = False) -> None:
    """Refuse, before the first batch is drawn, a meta-batch step that cannot fit.

    The whole batch is drawn at once: ``tasks`` (this rank's share) x ``examples_per_task`` float32
    inputs, held twice while they are normalised (three times with ``prefetch``: the next batch);
    then a chunk of tasks at a time runs, each example keeping what
    :func:`metamap.data.memory.graph_bytes_per_example` counts.
    """
    ep = config["episode"]
    per_task = examples_per_task if examples_per_task is not None else ep["ways"] * (ep["shots"] + ep["queries"])
    shape = tuple(info.example_shape)
    chunk = config["train"]["chunk_tasks"]
    chunk = learner.preferred_chunk() if chunk == "auto" else chunk
    chunk = min(chunk or tasks, tasks)
    # An inner mini-batch is at most the support set (GradientLearner clamps a larger one).
    need = (tasks * per_task * input_bytes(shape) * (3 if prefetch else 2)
            + chunk * per_task * graph_bytes_per_example(learner, shape))
    size = "x".join(map(str, shape))
    check_fits(need, f"one training step ({tasks} task(s) of {per_task} examples of {size}, {chunk} task(s) per pass)",
               "choose a smaller episode.tasks_per_batch, data.image_size, fewer ways or queries per episode, "
               "or a smaller train.chunk_tasks")


def default_run_dir(config: dict) -> Path:
    base = Path("runs") / f"{config['learner']['name']}-{config['data']['name']}-{time.strftime('%Y%m%d-%H%M%S')}"
    run, n = base, 1
    while run.exists():          # two runs started in the same second
        n += 1
        run = base.with_name(f"{base.name}-{n}")
    return run


def open_run_dir(run_dir: Path, resume: bool) -> Path | None:
    """Check ``run_dir`` before any work: a new run needs a new or empty folder (never one holding an
    earlier run); a resumed one needs a checkpoint, which a killed save may have left aside
    (put back here). Returns the checkpoint to resume from."""
    if not resume:
        if run_dir.exists() and not run_dir.is_dir():
            raise OutputError(f"--run-dir {run_dir} is a file, not a folder; choose another --run-dir")
        held = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK) if run_dir.is_dir() else []
        if held:
            hint = (f"resume it with --resume {run_dir}, " if any(n in held for n in ("last", "best"))
                    or any(n.startswith((".last.", ".best.")) for n in held) else "")
            raise CheckpointError(
                f"{run_dir} already holds {'a run' if 'metrics.jsonl' in held or 'config.toml' in held else 'files'} "
                f"({', '.join(held[:4])}{' ...' if len(held) > 4 else ''}); {hint}choose another --run-dir, or "
                "delete it to start again")
        check_writable_dir(run_dir, "--run-dir")
        return None
    if not run_dir.is_dir():
        raise CheckpointError(f"cannot resume {run_dir}: no such run folder")
    for name in ("last", "best"):
        checkpoint.recover(run_dir / name)
    return checkpoint.resume_source(run_dir)


@contextlib.contextmanager
def hold_run_dir(run_dir: Path):
    """Hold ``RUN/.lock`` while training, so that two processes never write one run folder."""
    try:
        import fcntl
    except ImportError:           # not POSIX: no lock
        yield
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise OutputError(f"cannot write in the run folder {run_dir} ({e.strerror or e}); training writes its "
                          "checkpoints there: copy the run to a writable place and resume that copy") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise CheckpointError(f"{run_dir} is in use by another metamap process (pid {owner}); wait for it "
                                  "to finish or stop it, or choose another --run-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def test_samplers(config: dict, source, split: str = "test") -> list:
    """One fixed-episode sampler per ``eval.ways x eval.shots`` setting (checked before any training)."""
    e = config["eval"]
    return [source.sampler(config, split, ways, shots, e["queries"], 1, e["seed"])
            for ways, shots in eval_settings(config)]


def check_test_memory(learner, config: dict, samplers: list, world_size: int = 1) -> None:
    """Every test setting's evaluation pass checked against the memory left, before any work."""
    e = config["eval"]
    for sampler in samplers:
        check_eval_memory(learner, sampler, trainer_share(e["episodes"], world_size), e["tasks_per_batch"],
                          test_time.enabled(e), e["cache_mb"])


def test(learner, config: dict, samplers: list, device, memory_format=None, progress: bool = True,
         episodes: int | None = None, rank: int = 0, world_size: int = 1, source=None, split: str = "test",
         echo=None) -> list[EvalResult]:
    """Evaluate on fixed episodes of every sampler of :func:`test_samplers`.

    With ``eval.finetune``, each setting is fine-tuned at test time, with the learning rate and
    steps given or chosen on episodes of ``source``'s validation classes (:func:`finetune_for`).
    """
    e = config["eval"]
    precision = resolve_precision(config["train"]["precision"], device, learner)[0]
    results = []
    for sampler in samplers:
        tuning, chosen = finetune_for(learner, config, source, sampler, split) if test_time.enabled(e) else (None, None)
        if chosen is not None and echo is not None and rank == 0:
            echo(f"{sampler.describe()}: {chosen.summary()}")
        result = evaluate(learner, sampler, episodes or e["episodes"], chunk=e["tasks_per_batch"], device=device,
                          memory_format=memory_format, progress=progress, setting=sampler.describe(), rank=rank,
                          world_size=world_size, precision=precision, cache_mb=e["cache_mb"], finetune=tuning)
        result.finetune = None if chosen is None else chosen.to_dict()
        results.append(result)
    return results


# Selection episodes are drawn with their own seed, so they are never the test episodes.
SELECTION_SEED_OFFSET = 7919


def finetune_for(learner, config: dict, source, sampler, split: str):
    """The test-time fine-tuning of one evaluation setting: ``(FineTuning, Selection)``.

    Automatic choices are made on episodes of the validation classes of the evaluated data at
    the same ways, shots and queries; the classes are checked to be disjoint from ``split``'s.
    """
    e = config["eval"]
    if not test_time.needs_selection(e):
        return test_time.choose(learner, e, None, "given")
    if split != "test" or source is None or not hasattr(source, "dataset"):
        raise ConfigError("automatic test-time fine-tuning picks its learning rate and steps on the validation "
                          "classes of labelled image data while testing on the test classes; give them instead "
                          "(eval.finetune_lr, eval.finetune_steps)")
    tune = getattr(source, "tuning_split", lambda _: "val")(config)
    val, evaluated = source.dataset(config, tune), source.dataset(config, split)
    shared = sorted(set(val.class_names) & set(evaluated.class_names))
    if shared:
        raise ConfigError(f"the validation classes share {len(shared)} class(es) with the test classes "
                          f"({', '.join(shared[:3])}), so they cannot pick test-time fine-tuning blind to the test "
                          "classes; give eval.finetune_lr and eval.finetune_steps")
    ways = getattr(sampler, "ways", 0)
    try:
        chooser = source.sampler(config, tune, ways, sampler.shots, sampler.queries, 1,
                                 e["seed"] + SELECTION_SEED_OFFSET)
    except EpisodeError as err:
        raise ConfigError(f"automatic test-time fine-tuning needs {ways}-way {sampler.shots}-shot episodes of the "
                          f"validation classes ({val.num_classes} classes): {err}; or give eval.finetune_lr and "
                          "eval.finetune_steps") from None
    where = (f"chosen on {e['finetune_episodes']} episodes of the validation classes: "
             f"{val.description or 'val split'}")
    return test_time.choose(learner, e, chooser, where)


def report(results: list[EvalResult], config: dict, source, split: str = "test") -> str:
    lines = [f"{split} data: {source.describe(config, split)}"]
    lines += [f"  {r.summary()}  [95% CI = 1.96 * std / sqrt(n)]" for r in results]
    return "\n".join(lines)


def train(config: dict, run_dir: str | Path | None = None, resume: str | Path | None = None,
          progress: bool = True, run_test: bool = True, echo=print, rank: int = 0, world_size: int = 1) -> dict:
    """Meta-train as ``config`` says (or resume ``resume``), then test the best checkpoint."""
    device = setup_runtime(config)
    run_dir = Path(resume) if resume else Path(run_dir) if run_dir else default_run_dir(config)
    if rank != 0:
        if world_size > 1:
            import torch.distributed as dist
            dist.barrier()          # rank 0 has checked the run folder (and put back a checkpoint) first
        return _train(config, run_dir, checkpoint.resume_source(run_dir) if resume else None, device, progress,
                      run_test, echo, rank, world_size)
    created = not resume and not run_dir.exists()
    if not resume:
        open_run_dir(run_dir, resume=False)
    try:
        with hold_run_dir(run_dir):
            start = open_run_dir(run_dir, resume=True) if resume else None
            if start is not None:       # before the data are loaded
                from metamap.train.trainer import check_same_run
                check_same_run(checkpoint.read_meta(start)[1], config, start)
            if world_size > 1:
                import torch.distributed as dist
                dist.barrier()
            return _train(config, run_dir, start, device, progress, run_test, echo, rank, world_size)
    except BaseException:
        # A run refused before it wrote anything leaves no empty folder behind.
        if created and run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {LOCK}:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _train(config: dict, run_dir: Path, start: Path | None, device, progress: bool, run_test: bool, echo,
           rank: int, world_size: int) -> dict:
    source, info, learner = build(config)
    if config["eval"]["protocol"] == "bscd-fsl" and not getattr(source, "held_out", lambda _: "")(config):
        raise ConfigError("the BSCD-FSL protocol tests on a domain never meta-trained on: train on the source "
                          "domain(s), then `metamap eval --checkpoint RUN --data TARGET --set eval.protocol=bscd-fsl` "
                          "(or hold the target out of a mixture: data.name = 'mixture', data.holdout = TARGET)")
    memory_format = memory_format_for(config, info)
    learner.to(device)
    if memory_format is not None:
        learner.to(memory_format=memory_format)
    ep = config["episode"]
    train_sampler = source.sampler(config, "train", ep["ways"], ep["shots"], ep["queries"],
                                   ep["tasks_per_batch"], config["seed"])
    samplers = test_samplers(config, source) if run_test else []   # a bad eval request fails now, not after training
    check_test_memory(learner, config, samplers, world_size)
    check_step_memory(learner, info, config, trainer_share(train_sampler.tasks_per_batch, world_size),
                      train_sampler.examples_per_task, prefetch=prefetching(config["train"], device))
    validate = make_validation(learner, config, source, device, memory_format, rank, world_size)
    meta = {"learner": config["learner"]["name"], "config": config, "data_info": info_to_dict(info)}
    callbacks = []
    if config["train"]["tensorboard"] and rank == 0:
        from metamap.train.callbacks import TensorBoardLogger
        callbacks.append(TensorBoardLogger(run_dir / "tensorboard"))
    trainer = Trainer(learner, train_sampler, config, run_dir, meta, validate=validate, device=device,
                      memory_format=memory_format, progress=progress, callbacks=callbacks, rank=rank,
                      world_size=world_size)
    if start is not None:
        trainer.resume(start)
        echo(f"resuming {run_dir} from {start.name}/ at step {trainer.step} of {config['train']['steps']}")
    if rank == 0:
        write_text(run_dir / "config.toml", configlib.dumps(config))
    echo(f"precision: {trainer.precision} ({trainer.precision_reason})")
    echo(f"meta-training {config['learner']['name']} on {info.description or config['data']['name']}: "
         f"{train_sampler.describe()}, {train_sampler.tasks_per_batch} task(s) per batch, "
         f"{config['train']['steps']} batches -> {run_dir}")
    t0 = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - t0
    if world_size > 1:
        import torch.distributed as dist
        dist.barrier()              # rank 0 has finished writing best/ before anyone reads it
    summary = {"run_dir": str(run_dir), "steps": trainer.step, "train_seconds": round(wall, 1),
               "best": trainer.best}
    if run_test:
        best = checkpoint.resolve_path(run_dir / "best")
        path, best_meta = checkpoint.read_meta(best)
        checkpoint.load_state(learner, checkpoint.read_tensors(path, checkpoint.WEIGHTS, best_meta), path)
        results = test(learner, config, samplers, device, memory_format, progress, rank=rank, world_size=world_size,
                       source=source, echo=echo)
        summary["test"] = [r.to_dict() for r in results]
        echo(f"best checkpoint: {best} (step {best_meta['step']})")
        echo(report(results, config, source))
    if rank == 0:
        write_text(run_dir / "results.json", json.dumps(summary, indent=2))
        if config["train"]["report"]:
            # The figure of test tasks uses the best checkpoint, loaded afresh on the CPU.
            best = checkpoint.load_learner(run_dir / "best").learner if run_test else None
            echo(f"report: {write_report(run_dir, best, info.spec, config)}")
        else:
            curves = plot_curves(run_dir)
            if curves:
                echo(f"learning curves: {curves}")
    return summary


def make_validation(learner, config: dict, source, device, memory_format, rank: int = 0, world_size: int = 1):
    """Fixed validation episodes (``train.val_seed``) at the largest eval setting the split allows."""
    t = config["train"]
    if not t["val_every"]:
        return None
    limit = source.classes(config, "val")
    if limit is not None and limit < 2:
        return None
    fixed = getattr(learner, "ways", 0)          # learners whose head is built for one number of ways
    if fixed and limit and limit < fixed:
        warnings.warn(f"validation skipped: the val split has {limit} classes, fewer than this "
                      f"learner's {fixed} ways", stacklevel=2)
        return None
    # The largest eval setting the val split can sample: a split with fewer examples per class than
    # the largest setting's shots + queries (Omniglot's 20 drawings against 20 shots + 15 queries)
    # still validates, at fewer shots, instead of training with no model selection at all.
    sampler, refused = None, []
    for ways, shots in sorted(set(eval_settings(config)), reverse=True):
        ways = fixed or (min(ways, limit) if limit else ways)
        try:
            sampler = source.sampler(config, "val", ways, shots, config["eval"]["queries"], 1, t["val_seed"])
            break
        except EpisodeError as e:
            refused.append(f"{ways}-way {shots}-shot: {e}")
    if sampler is None:
        warnings.warn("validation skipped: no eval setting can be sampled from the val split ("
                      + "; ".join(refused) + "); the last checkpoint becomes the best", stacklevel=2)
        return None
    precision = resolve_precision(t["precision"], device, learner)[0]
    return lambda: evaluate(learner, sampler, t["val_episodes"], device=device, memory_format=memory_format,
                            progress=False, setting=f"val {sampler.describe()}", rank=rank,
                            world_size=world_size, precision=precision, cache_mb=config["eval"]["cache_mb"])


def evaluate_checkpoint(path: str | Path, overrides: list[str] = (), split: str = "test",
                        progress: bool = True, echo=print) -> list[EvalResult]:
    """``metamap eval``: rebuild the learner of a checkpoint and test it on its data, or on another
    domain (``data.name=...``: its images converted to the checkpoint's channels, size and
    normalisation)."""
    from metamap.data.convert import ConvertedSource
    from metamap.train.checkpoint import load_learner
    path, meta = checkpoint.read_meta(path)
    checkpoint.check_rebuild(meta, path)
    config = configlib.resolve(overrides=list(overrides), base=checkpoint_base(meta["config"], overrides))
    for section, key in (("learner", "name"), ("model", "backbone")):
        if config[section][key] != meta["config"][section][key]:
            raise ConfigError(
                f"{path} holds a {section}.{key} = {meta['config'][section][key]!r} model; eval cannot make it "
                f"a {config[section][key]!r} one. Drop the {section}.{key} override, or evaluate a checkpoint "
                f"trained as {config[section][key]!r}")
    device = setup_runtime(config)
    loaded = load_learner(path, device=str(device))
    learner = loaded.learner
    adaptation = eval_overrides.check(loaded.config, config, overrides)
    if adaptation:
        # The same weights in a learner built with the new adaptation settings.
        rebuilt = build_learner(config, loaded.info)
        checkpoint.load_state(rebuilt, learner.state_dict(), path)
        learner = rebuilt.to(device).eval()
        echo("adaptation overrides: " + ", ".join(f"learner.{k} = {new!r} (trained with {old!r})"
                                                  for k, (old, new) in adaptation.items()))
    source = data_source(config)
    trained_on = meta["config"]["data"]["name"]
    if loaded.spec is not None and hasattr(source, "dataset"):
        source = ConvertedSource(source, loaded.spec)
    memory_format = memory_format_for(config, loaded.info)
    if memory_format is not None:
        learner.to(memory_format=memory_format)
    precision, why = resolve_precision(config["train"]["precision"], device, learner)
    echo(f"precision: {precision} ({why})")
    if config["data"]["name"] != trained_on:
        echo(f"cross-domain: meta-trained on {trained_on}, evaluated on {config['data']['name']}")
    samplers = test_samplers(config, source, split)
    check_test_memory(learner, config, samplers)
    results = test(learner, config, samplers, device, memory_format, progress, source=source, split=split, echo=echo)
    echo(f"checkpoint: {path} ({meta['learner']}, step {meta['step']})")
    echo(report(results, config, source, split))
    return results


def checkpoint_base(saved: dict, overrides) -> dict:
    """The checkpoint's config as the base of an evaluation; another ``data.name`` starts that
    source's ``[data]`` from its own defaults instead of the training data's keys."""
    wanted = None
    for item in overrides:
        parsed = configlib.parse_override(item)
        if isinstance(parsed.get("data"), dict) and "name" in parsed["data"]:
            wanted = parsed["data"]["name"]
    if wanted is None or wanted == saved["data"]["name"]:
        return saved
    return {**saved, "data": {"name": wanted}}

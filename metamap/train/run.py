"""From a resolved config to a trained, evaluated checkpoint: what ``metamap train``/``eval`` do."""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from metamap import config as configlib
from metamap.errors import CheckpointError, ConfigError, EpisodeError
from metamap.registry import DataInfo, build_learner, data_source
from metamap.train import checkpoint
from metamap.train.evaluate import EvalResult, evaluate
from metamap.train.plots import plot_curves
from metamap.train.precision import resolve_precision
from metamap.train import test_time
from metamap.train.runtime import pick_device, set_threads, tune_allocator
from metamap.train.trainer import Trainer


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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config["seed"] + seed_offset)
        learner = build_learner(config, info)
    return source, info, learner


def default_run_dir(config: dict) -> Path:
    return Path("runs") / f"{config['learner']['name']}-{config['data']['name']}-{time.strftime('%Y%m%d-%H%M%S')}"


def test_samplers(config: dict, source, split: str = "test") -> list:
    """One fixed-episode sampler per ``eval.ways x eval.shots`` setting (checked before any training)."""
    e = config["eval"]
    return [source.sampler(config, split, ways, shots, e["queries"], 1, e["seed"])
            for ways, shots in eval_settings(config)]


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
    val, evaluated = source.dataset(config, "val"), source.dataset(config, split)
    shared = sorted(set(val.class_names) & set(evaluated.class_names))
    if shared:
        raise ConfigError(f"the validation classes share {len(shared)} class(es) with the test classes "
                          f"({', '.join(shared[:3])}), so they cannot pick test-time fine-tuning blind to the test "
                          "classes; give eval.finetune_lr and eval.finetune_steps")
    ways = getattr(sampler, "ways", 0)
    try:
        chooser = source.sampler(config, "val", ways, sampler.shots, sampler.queries, 1,
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
    if not resume and (run_dir / "last").exists():
        raise CheckpointError(f"{run_dir} already holds a run; resume it with --resume {run_dir} "
                              "or choose another --run-dir")
    source, info, learner = build(config)
    memory_format = memory_format_for(config, info)
    learner.to(device)
    if memory_format is not None:
        learner.to(memory_format=memory_format)
    ep = config["episode"]
    train_sampler = source.sampler(config, "train", ep["ways"], ep["shots"], ep["queries"],
                                   ep["tasks_per_batch"], config["seed"])
    samplers = test_samplers(config, source) if run_test else []   # a bad eval request fails now, not after training
    validate = make_validation(learner, config, source, device, memory_format, rank, world_size)
    meta = {"learner": config["learner"]["name"], "config": config, "data_info": info_to_dict(info)}
    callbacks = []
    if config["train"]["tensorboard"] and rank == 0:
        from metamap.train.callbacks import TensorBoardLogger
        callbacks.append(TensorBoardLogger(run_dir))
    trainer = Trainer(learner, train_sampler, config, run_dir, meta, validate=validate, device=device,
                      memory_format=memory_format, progress=progress, callbacks=callbacks, rank=rank,
                      world_size=world_size)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(configlib.dumps(config))
    if resume:
        trainer.resume(run_dir / "last")
        echo(f"resuming {run_dir} at step {trainer.step} of {config['train']['steps']}")
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
        (run_dir / "results.json").write_text(json.dumps(summary, indent=2))
        if config["train"]["report"]:
            from metamap.report import write_report
            echo(f"report: {write_report(run_dir, episodes=run_test)}")
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
    ways, shots = max(eval_settings(config))
    fixed = getattr(learner, "ways", 0)          # learners whose head is built for one number of ways
    if fixed:
        ways = fixed
        if limit and limit < fixed:
            warnings.warn(f"validation skipped: the val split has {limit} classes, fewer than this "
                          f"learner's {fixed} ways", stacklevel=2)
            return None
    ways = min(ways, limit) if limit else ways
    try:
        sampler = source.sampler(config, "val", ways, shots, config["eval"]["queries"], 1, t["val_seed"])
    except EpisodeError:
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
    config = configlib.resolve(overrides=list(overrides), base=checkpoint_base(meta["config"], overrides))
    device = setup_runtime(config)
    loaded = load_learner(path, device=str(device))
    learner = loaded.learner
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
    results = test(learner, config, test_samplers(config, source, split), device, memory_format, progress,
                   source=source, split=split, echo=echo)
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

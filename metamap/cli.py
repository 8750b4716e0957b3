"""``metamap train | eval | predict | learners``.

Every flag of ``train`` and ``eval`` is a shorthand for one config key (``--steps 500`` is
``--set train.steps=500``); user errors print one clear message and exit with status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import sys
from pathlib import Path

from metamap import config as configlib
from metamap.data.paths import check_output_file, write_text
from metamap.errors import MetamapError

# flag -> (config key, type, help)
FLAG_KEYS = {
    "learner": ("learner.name", str, "meta-learner (see `metamap learners`)"),
    "data": ("data.name", str, "data source, e.g. omniglot"),
    "split": ("data.split", str, "class split of the data set (omniglot: lake | vinyals | vinyals-trainval)"),
    "data_root": ("data.root", str, "folder holding the data set archives (else $METAMAP_DATA, else the cache)"),
    "steps": ("train.steps", int, "meta-training batches"),
    "ways": ("episode.ways", int, "classes per training task (N)"),
    "shots": ("episode.shots", int, "support examples per class in training tasks (K)"),
    "queries": ("episode.queries", int, "query examples per class in training tasks"),
    "meta_batch": ("episode.tasks_per_batch", int, "tasks per meta-batch"),
    "lr": ("optim.lr", float, "outer (meta) learning rate"),
    "seed": ("seed", int, "seed of every random choice"),
    "device": ("train.device", str, "cpu | cuda | auto"),
    "threads": ("train.threads", int, "CPU threads (0 = one per core)"),
    "episodes": ("eval.episodes", int, "fixed test episodes per setting"),
}


def add_config_flags(p: argparse.ArgumentParser, names) -> None:
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set schedule.step_size=2000 (repeatable)")
    for name in names:
        key, typ, text = FLAG_KEYS[name]
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None,
                       help=f"{text} [{key}]")


def overrides_from(args, names) -> list[str]:
    out = []
    for name in names:
        value = getattr(args, name)
        if value is not None:
            key, typ, _ = FLAG_KEYS[name]
            out.append(f"{key}={value!r}" if typ is str else f"{key}={value}")
    return out + list(args.overrides)


TRAIN_FLAGS = list(FLAG_KEYS)
EVAL_FLAGS = ["data", "episodes", "seed", "device", "threads", "data_root"]


def cmd_train(args) -> int:
    from metamap.train import checkpoint
    from metamap.train.run import train
    overrides = overrides_from(args, TRAIN_FLAGS)
    if args.resume:
        _, meta = checkpoint.read_meta(checkpoint.resume_source(args.resume))
        checkpoint.check_rebuild(meta, Path(args.resume))
        config = configlib.resolve(args.config, overrides, base=meta["config"])
    else:
        config = configlib.resolve(args.config, overrides)
    from metamap.train.distributed import init_from_env
    from metamap.train.runtime import pick_device
    rank, world_size = init_from_env(pick_device(config["train"]["device"]))
    if world_size > 1 and not args.run_dir and not args.resume:
        raise configlib.ConfigError("with several ranks, give --run-dir so that all ranks agree on it")
    echo = print if rank == 0 else (lambda *a, **k: None)
    echo("resolved config:\n" + configlib.dumps(config), flush=True)
    train(config, run_dir=args.run_dir, resume=args.resume, progress=not args.quiet,
          run_test=not args.no_test, echo=echo, rank=rank, world_size=world_size)
    return 0


def cmd_eval(args) -> int:
    from metamap.train.run import evaluate_checkpoint
    if args.json:
        check_output_file(args.json, "--json")           # before the evaluation, not after it
    overrides = overrides_from(args, EVAL_FLAGS)
    results = evaluate_checkpoint(args.checkpoint, overrides, split=args.split, progress=not args.quiet)
    if args.json:
        import json
        write_text(args.json, json.dumps([r.to_dict(with_scores=True) for r in results], indent=2))
    return 0


# A cell starting with one of these is a formula to a spreadsheet (CSV injection): prefix a quote.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(text: str) -> str:
    return "'" + text if text.startswith(FORMULA_PREFIXES) else text


def cmd_predict(args) -> int:
    from metamap.predict import finetune_settings, predict_folders
    if args.out:
        check_output_file(args.out, "--out")              # before the predictions, not after them
    tune = any(v is not None for v in (args.finetune_lr, args.finetune_steps, args.finetune_norm,
                                       args.finetune_select))
    settings = finetune_settings(args.finetune_lr, args.finetune_steps, args.finetune_seed, args.finetune_norm,
                                 args.finetune_select is not None, args.finetune_episodes) if tune else None
    chosen: dict = {}
    rows = predict_folders(args.checkpoint, args.support, args.query, finetune=settings, select=args.finetune_select,
                           echo=lambda line: print(line, file=sys.stderr), record=chosen)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["file", "prediction", "score"])
    for row in rows:
        writer.writerow([csv_cell(row.file), csv_cell(row.prediction), f"{row.score:.6f}"])
    if args.out:
        write_text(args.out, out.getvalue())
        print(f"wrote {len(rows)} predictions to {args.out}", file=sys.stderr)
        if tune:
            import json
            record = Path(str(args.out) + ".finetune.json")
            write_text(record, json.dumps(chosen, indent=2))
            print(f"test-time fine-tuning recorded in {record}", file=sys.stderr)
    else:
        sys.stdout.write(out.getvalue())
    return 0


def cmd_export(args) -> int:
    from metamap.export import export_classifier      # checks --out before any work
    print(export_classifier(args.checkpoint, args.support, args.out).summary())
    return 0


def cmd_report(args) -> int:
    import metamap
    from metamap.report import check_run_dir, write_report
    run = check_run_dir(args.run_dir)
    loaded = None if args.no_episodes else metamap.load(run)
    learner, spec, config = (None, None, None) if loaded is None else (loaded.learner, loaded.spec, loaded.config)
    print(f"wrote {write_report(run, learner, spec, config)}")
    return 0


def cmd_compare(args) -> int:
    from metamap.report import compare
    check_output_file(args.out, "--out")
    plot, table = compare(args.run_dirs, args.out)
    print(table)
    print(f"plot: {plot}")
    return 0


def cmd_build_kernels(args) -> int:
    import warnings

    from metamap.nets import kernels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # the failure is reported below, once
        kernels.build(verbose=args.verbose)
    if kernels.failure() is not None:
        raise MetamapError(f"could not build the C++ kernels ({kernels.failure()}); install a C++ compiler "
                           "and `pip install ninja`, or train with learner.cpp_kernels = false (same results, slower)")
    for stem in kernels.SOURCES:
        print(f"built the C++ kernel {stem}: {kernels.extension_name(stem)[0]} ({kernels.build_source(stem).__file__})")
    return 0


def cmd_learners(args) -> int:
    from metamap.registry import learners
    for name, entry in sorted(learners().items()):
        print(f"{name:14s} {entry.family:13s} {entry.summary}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metamap", description="Meta-learning: train, evaluate and use few-shot learners.")
    sub = p.add_subparsers(dest="command")

    t = sub.add_parser("train", help="meta-train a learner (no arguments: ProtoNet on Omniglot, lake split)")
    t.add_argument("config", nargs="?", help="TOML config file (see configs/); flags override it")
    t.add_argument("--run-dir", help="where checkpoints, logs and results go (default runs/<learner>-<data>-<time>)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    t.add_argument("--no-test", action="store_true", help="skip the final test evaluation")
    t.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    add_config_flags(t, TRAIN_FLAGS)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint on fixed test episodes (mean ± 95%% CI)")
    e.add_argument("--checkpoint", "-c", required=True, help="checkpoint folder or run folder")
    e.add_argument("--split", default="test", choices=["test", "val"], help="which classes to evaluate on")
    e.add_argument("--json", help="also write the results (with per-episode scores) to this JSON file")
    e.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    add_config_flags(e, EVAL_FLAGS)
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser("predict", help="classify new images from a few labelled examples of new classes")
    r.add_argument("--checkpoint", "-c", required=True, help="checkpoint folder or run folder")
    r.add_argument("--support", required=True, help="folder with one sub-folder of images per class")
    r.add_argument("--query", required=True, help="folder of images to classify")
    r.add_argument("--out", help="CSV file to write (default: standard output)")
    r.add_argument("--finetune-lr", type=float, default=None,
                   help="fine-tune the learner on the support set first, with this learning rate (test-time fine-tuning)")
    r.add_argument("--finetune-steps", type=int, default=None, help="... for this many steps")
    r.add_argument("--finetune-norm", type=float, default=None, metavar="W",
                   help="first mix the support set's batch-norm statistics into the checkpoint's with weight W "
                        "(0 = none, 1 = the support set's alone); default: chosen on --finetune-select, else 0")
    r.add_argument("--finetune-select", metavar="FOLDER", default=None,
                   help="labelled images of OTHER classes (one sub-folder each) to choose the learning rate, "
                        "steps and batch-norm weight not given on (P>M>F's recipe, with a paired rule)")
    r.add_argument("--finetune-episodes", type=int, default=None, metavar="N",
                   help="episodes of --finetune-select the choice is made on (default 30)")
    r.add_argument("--finetune-seed", type=int, default=0, help="seed of the fine-tuning's augmentation")
    r.set_defaults(func=cmd_predict)

    x = sub.add_parser("export", help="write a standalone ONNX classifier for the classes of a support folder")
    x.add_argument("--checkpoint", "-c", required=True, help="checkpoint folder or run folder")
    x.add_argument("--support", required=True, help="folder with one sub-folder of images per class")
    x.add_argument("--out", required=True, help="ONNX file to write, e.g. classifier.onnx")
    x.set_defaults(func=cmd_export)

    rep = sub.add_parser("report", help="(re)generate a run's curves, test-episode grid and HTML report")
    rep.add_argument("run_dir")
    rep.add_argument("--no-episodes", action="store_true", help="skip the grid of test episodes")
    rep.set_defaults(func=cmd_report)

    cmp_ = sub.add_parser("compare", help="several runs on one plot and one table")
    cmp_.add_argument("run_dirs", nargs="+")
    cmp_.add_argument("--out", default="compare.png", help="plot file to write (default compare.png)")
    cmp_.set_defaults(func=cmd_compare)

    lst = sub.add_parser("learners", help="list the available meta-learners")
    lst.set_defaults(func=cmd_learners)

    kb = sub.add_parser("build-kernels", help="compile the optional C++ kernels now (else on first use)")
    kb.add_argument("--verbose", "-v", action="store_true", help="show the compiler's output")
    kb.set_defaults(func=cmd_build_kernels)
    return p


@contextlib.contextmanager
def one_line_warnings(command: str):
    """metamap's own warnings as one line each, as its errors are (``metamap train: warning: ...``);
    other libraries' warnings as Python shows them."""
    import warnings
    shown, package = warnings.showwarning, str(Path(__file__).resolve().parent)

    def show(message, category, filename, lineno, file=None, line=None):
        if str(filename).startswith(package) and issubclass(category, UserWarning):
            print(f"metamap {command}: warning: {message}", file=sys.stderr if file is None else file)
        else:
            shown(message, category, filename, lineno, file, line)
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from metamap.train.trainer import TrainingInterrupted
    try:
        with one_line_warnings(args.command):
            return args.func(args)
    except TrainingInterrupted as e:
        print(f"metamap {args.command}: {e}", file=sys.stderr)
        return 128 + e.signum
    except MetamapError as e:
        print(f"metamap {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"metamap {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

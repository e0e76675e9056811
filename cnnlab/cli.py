"""The ``cnnlab`` command: parsed arguments become one call of a lower module, errors become one
line and an exit code. The grammar is cli_parser's; the relaunch on N processes and which rank
speaks are launch's."""
from __future__ import annotations

import json
import sys

from . import launch
from .cli_options import TRAIN_KEYS, TRANSFER_KEYS, given_settings
from .cli_parser import build_parser
from .config import ReproduceConfig, TransferConfig
from .errors import CnnlabError, RunInterrupted



# beside --resume or --resume-if-exists: where a run computes, not what (data and labels: where its images
# and their labels lie, checked to be the same ones); every other setting given must be the run's own
HONOURED = ("threads", "device", "data", "labels")
FLAGS = {"preset": "--model", "backbone": "--model", "weights_file": "--weights"}


def _continue(run_dir, given: dict, how: str) -> int:
    """Continues ``run_dir`` (``how``: --resume or --resume-if-exists) with the settings ``given`` beside
    it: those that would change the run refused in one line, the ``HONOURED`` ones taken."""
    from .runs import load_run
    from .train import resume
    from .transfer import resume_transfer
    config = load_run(run_dir)[0]
    honoured = HONOURED if "split_digests" in config else HONOURED[:2]  # an older run: its data unchecked
    changed = [f"{FLAGS.get(k, '--' + k.replace('_', '-'))} {v} (the run's: {config.get(k)})"
               for k, v in given.items() if k not in honoured and v != config.get(k)]
    if changed:
        raise CnnlabError(f"{how} continues {run_dir} as it was started, and {', '.join(changed)} would change it; "
                          "drop them, or train a new run with them (another --name)")
    taken = {k: v for k, v in given.items() if k in honoured and v != config.get(k)}
    if taken:
        launch.say(f"notice: this attempt at {run_dir} takes " + ", ".join(
            f"--{k} {v} (the run's: {config.get(k)})" for k, v in taken.items()) + ": where it runs and reads, not "
            "what it trains (bit for bit the same on the same device and threads)")
    go_on = resume_transfer if config.get("kind") == "transfer" else resume
    launch.say(str(go_on(run_dir, log=launch.say, honoured=taken)))
    return 0


def _if_exists(args, out: str, name: str, given: dict) -> tuple[int | None, object]:
    """--resume-if-exists: (exit code, None) once the run out/name was continued (or found finished);
    (None, where to start it) when it is not there yet; (None, None) without the option."""
    if not args.resume_if_exists:
        return None, None
    from .runs import existing_run
    run_dir, there = existing_run(out, name)
    if there:  # --out and --name found it
        return _continue(run_dir, {k: v for k, v in given.items() if k not in ("out", "name")},
                         "--resume-if-exists"), None
    return None, run_dir


def cmd_train(args) -> int:
    from .presets import resolve_config
    from .train import train
    if args.nproc and args.nproc > 1 and not launch.under_torchrun():
        return launch.torchrun(args.nproc, args.argv)
    given = {**({"preset": args.preset} if args.preset else {}), **given_settings(args, TRAIN_KEYS)}
    if args.resume:
        if args.resume_if_exists:
            raise CnnlabError("--resume RUN_DIR and --resume-if-exists both name a run to continue; give one")
        return _continue(args.resume, given, "--resume")
    if args.preset is None:
        raise CnnlabError("--model is required: a preset (`cnnlab presets` lists them) or a torchvision architecture "
                          "such as resnet18; or --resume RUN_DIR to continue a run")
    if args.data is None:
        raise CnnlabError("--data is required (or --resume RUN_DIR to continue a run)")
    cfg = resolve_config(args.preset, **given_settings(args, TRAIN_KEYS))
    code, run_dir = _if_exists(args, cfg.out, cfg.name or cfg.preset, given)
    if code is not None:
        return code
    launch.say(str(train(cfg, log=launch.say, run_dir=run_dir)))
    return 0


def cmd_transfer(args) -> int:
    from .config import validate_transfer
    from .transfer import transfer
    cfg = TransferConfig(**given_settings(args, TRANSFER_KEYS))
    validate_transfer(cfg)
    code, run_dir = _if_exists(args, cfg.out, cfg.name or f"transfer-{cfg.backbone}", given_settings(args, TRANSFER_KEYS))
    if code is not None:
        return code
    launch.say(str(transfer(cfg, log=launch.say, run_dir=run_dir)))
    return 0


def cmd_predict(args) -> int:
    from .predict import format_prediction, iter_predictions, predict
    if args.json:
        print(json.dumps({"predictions": predict(args.images, args.model, args.weights_file, args.top)}))
        return 0
    for result in iter_predictions(args.images, args.model, args.weights_file, args.top):  # a line per image, as it goes
        print(format_prediction(result), flush=True)
    return 0


def cmd_explain(args) -> int:
    from .explain import explain
    for path in explain(args.images, args.model, args.weights_file, args.class_name, args.out):
        print(path)
    return 0


def cmd_export(args) -> int:
    from .export import export_run
    print(export_run(args.run_dir, args.output, args.format, log=launch.say, int8=args.int8, max_drop=args.max_drop))
    return 0


def cmd_serve(args) -> int:
    from .config import ServeConfig
    from .serve import serve
    serve(ServeConfig(args.model, args.host, args.port, args.max_upload_mb, args.batch_delay_ms, args.max_batch,
                      args.top, args.threads), log=launch.say, log_error=lambda m: print(m, file=sys.stderr, flush=True))
    return 0


def cmd_report(args) -> int:
    from .report import build_report
    print(build_report(args.run_dirs, args.output, args.title, log=launch.say))
    return 0


def cmd_reproduce(args) -> int:
    from .study import reproduce_study
    cfg = ReproduceConfig(args.data_root, args.out, args.quick, args.backbone, args.weights_file, args.seed,
                          args.precision, args.threads)
    report, failures = reproduce_study(cfg, launch.say)
    if failures:
        launch.error(f"cnnlab reproduce: {len(failures)} part(s) failed (the report lists them): "
                     + "; ".join(failures))
    launch.say(str(report))
    return 1 if failures else 0


def cmd_resume(args) -> int:
    return _continue(args.run_dir, {}, "cnnlab resume")


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_run, format_report
    from .runs import load_run
    result = evaluate_run(args.run_dir, args.data, args.labels, args.multi_label, args.threshold)
    print(json.dumps(result) if args.json else format_report(result, load_run(args.run_dir)[0]["class_names"]))
    return 0


def cmd_presets(args) -> int:
    from .presets import presets_listing
    print(presets_listing())
    return 0


def cmd_summary(args) -> int:
    from .presets import summary_table
    print(summary_table(args.preset, args.image_size, args.classes))
    return 0


def cmd_study(args) -> int:
    from .study import SEED_PRESETS, run_cifar10_study, write_study_table
    presets = tuple(p.strip() for p in args.presets.split(",")) if args.presets else SEED_PRESETS
    runs = run_cifar10_study(args.data, args.out, args.epochs_scale, args.seed or 0, presets, log=launch.say,
                             val_split=args.val_split, test_split=args.test_split, batch_size=args.batch_size,
                             precision=args.precision, threads=args.threads, labels=args.labels)
    if launch.MAIN_RANK:
        table, path = write_study_table(runs, args.out)
        print("\n" + table)
        print(f"\ntable saved to {path}")
    return 0


def cmd_lr_find(args) -> int:
    from .lr_finder import describe, lr_find, output_path
    options = given_settings(args, ("labels", "multi_label", "val_split", "test_split", "seed", "epochs", "batch_size",
                                    "optimizer", "image_size", "threads", "device", "precision"))
    path = output_path(args.output, args.out, args.model)
    result = lr_find(args.model, args.data, path, log=launch.say, **options)
    launch.say(f"plot: {path}")
    print(describe(result))
    return 0


COMMANDS = {"train": cmd_train, "resume": cmd_resume, "transfer": cmd_transfer, "predict": cmd_predict,
            "report": cmd_report, "reproduce": cmd_reproduce, "evaluate": cmd_evaluate, "presets": cmd_presets,
            "summary": cmd_summary, "study": cmd_study, "export": cmd_export, "explain": cmd_explain,
            "lr-find": cmd_lr_find, "serve": cmd_serve}


def main(argv: list[str] | None = None) -> int:
    """The ``cnnlab`` command (under torchrun, one rank of it). With no arguments: the help and its
    examples on stdout, exit code 0, as for ``--help``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv:
        if launch.MAIN_RANK:
            parser.print_help()
        return 0
    args = parser.parse_args(argv)
    args.argv = argv
    launch.quiet_warnings()
    if args.command in ("train", "resume", "transfer"):
        from .interrupts import hold_requeue_signal  # Slurm's SIGUSR1 while loading: the run stops at its first batch
        hold_requeue_signal()
    from .runtime import keep_freed_memory
    keep_freed_memory()
    code = None
    try:
        code = COMMANDS[args.command](args)
        return code
    except RunInterrupted as exc:
        launch.error(f"cnnlab {args.command}: stopped by {exc}")
        return exc.exit_code
    except CnnlabError as exc:
        launch.error(f"cnnlab {args.command}: error: {exc}")
        return 2
    except RuntimeError as exc:
        reason = launch.peer_lost(exc)
        if reason is None:
            raise
        launch.error(f"cnnlab {args.command}: error: another rank stopped ({reason}), so this one stops too; the "
                     "run's last epoch checkpoint is kept: continue with `cnnlab resume RUN_DIR`")
        return 1
    except OSError as exc:  # the file system said no somewhere no check foresaw: still one line
        where = f" ({exc.filename})" if exc.filename else ""
        launch.error(f"cnnlab {args.command}: error: {exc.strerror or exc}{where}; check the paths given and the "
                     "free disk space")
        return 2
    except KeyboardInterrupt:
        launch.error(f"cnnlab {args.command}: interrupted")
        return 130
    finally:
        launch.close(succeeded=code == 0)


if __name__ == "__main__":
    sys.exit(main())

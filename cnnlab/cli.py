"""The ``cnnlab`` command: parsed arguments become one call of a lower module, errors become one
line and an exit code. The grammar is cli_parser's; the relaunch on N processes and which rank
speaks are launch's."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from . import launch
from .cli_parser import build_parser
from .config import ReproduceConfig, TrainConfig, TransferConfig
from .errors import CnnlabError, RunInterrupted

TRAIN_KEYS = tuple(f.name for f in fields(TrainConfig) if f.name != "preset")
TRANSFER_KEYS = tuple(f.name for f in fields(TransferConfig))


def _settings(args, keys) -> dict:
    """The settings among ``keys`` that the command line set (None: the config's default)."""
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def cmd_train(args) -> int:
    from .presets import resolve_config
    from .train import train
    if args.nproc and args.nproc > 1 and not launch.under_torchrun():
        return launch.torchrun(args.nproc, args.argv)
    if args.resume:
        return cmd_resume(argparse.Namespace(run_dir=args.resume))
    if args.preset is None:
        raise CnnlabError("--model PRESET is required (--preset PRESET is the same; see `cnnlab presets`), or "
                          "--resume RUN_DIR to continue a run")
    if args.data is None:
        raise CnnlabError("--data is required (or --resume RUN_DIR to continue a run)")
    launch.say(str(train(resolve_config(args.preset, **_settings(args, TRAIN_KEYS)), log=launch.say)))
    return 0


def cmd_transfer(args) -> int:
    from .transfer import transfer
    launch.say(str(transfer(TransferConfig(**_settings(args, TRANSFER_KEYS)), log=launch.say)))
    return 0


def cmd_predict(args) -> int:
    from .predict import format_predictions, predict
    results = predict(args.images, args.model, args.weights_file, args.top)
    print(json.dumps({"predictions": results}) if args.json else format_predictions(results))
    return 0


def cmd_explain(args) -> int:
    from .explain import explain
    for path in explain(args.images, args.model, args.weights_file, args.class_name, args.out):
        print(path)
    return 0


def cmd_export(args) -> int:
    from .export import export_run
    print(export_run(args.run_dir, args.output, args.format, log=launch.say))
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
    from .runs import load_run
    from .train import resume
    from .transfer import resume_transfer
    transfer_run = load_run(args.run_dir)[0].get("kind") == "transfer"
    launch.say(str((resume_transfer if transfer_run else resume)(args.run_dir, log=launch.say)))
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate_run, format_report
    from .runs import load_run
    result = evaluate_run(args.run_dir, args.data)
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
                             precision=args.precision, threads=args.threads)
    if launch.MAIN_RANK:
        table, path = write_study_table(runs, args.out)
        print("\n" + table)
        print(f"\ntable saved to {path}")
    return 0


COMMANDS = {"train": cmd_train, "resume": cmd_resume, "transfer": cmd_transfer, "predict": cmd_predict,
            "report": cmd_report, "reproduce": cmd_reproduce, "evaluate": cmd_evaluate, "presets": cmd_presets,
            "summary": cmd_summary, "study": cmd_study, "export": cmd_export, "explain": cmd_explain}


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

"""The grammar of putting a model to use: `cnnlab export`'s int8 options and `cnnlab serve`
(cli_parser.py builds the rest). Defaults come from config.ServeConfig. Nothing here imports torch."""
from __future__ import annotations

from .cli_examples import EPILOGS
from .cli_options import number, positional_or_model
from .config import ServeConfig


def add_int8(p) -> None:
    """--int8 and --max-drop on `cnnlab export`."""
    g = p.add_argument_group("int8", "a quantized file for CPUs (onnxruntime's static quantization)")
    g.add_argument("--int8", action="store_true",
                   help="write an int8 file (default RUN_DIR/model-int8.onnx), calibrated on a few hundred of the "
                        "run's training images; both files then score the run's test split, printed side by side")
    number(g, "--max-drop", float, 0, "POINTS",
           help="with --int8: write nothing if the int8 file's test accuracy (mAP for several labels per image) is "
                "more than POINTS points below the float file's (default 1)")


def _one_model(parser, args) -> None:
    """`cnnlab serve` takes its model as MODEL or as --model MODEL: ``args.model`` either way."""
    positional_or_model(parser, args, "model", "model_given", "model", "MODEL")


def add_serve(sub) -> None:
    """`cnnlab serve`'s parser."""
    p = sub.add_parser("serve", help="an HTTP server for a run or an .onnx file, with a page to try it",
                       epilog=EPILOGS["serve"], description="Serve a finished run (PyTorch, with Grad-CAM on the page) "
                       "or a file made by `cnnlab export` (onnxruntime, float or int8): POST /predict answers the top "
                       "classes of uploaded images as JSON, GET / is a page to try it, GET /health and GET /metadata "
                       "say what runs. Runs until Ctrl-C or SIGTERM (docs/serving.md).")
    p.add_argument("model_given", nargs="?", metavar="MODEL", help="a run directory or an .onnx file (or --model MODEL)")
    p.add_argument("--model", metavar="MODEL", help="the run directory or .onnx file, given as an option")
    p.finish = _one_model
    g = p.add_argument_group("network")
    g.add_argument("--host", default=ServeConfig.host, help=f"the address to listen on (default {ServeConfig.host}: "
                   "this machine only; 0.0.0.0: every machine that reaches this one)")
    number(g, "--port", int, 0, "PORT", below=65536, default=ServeConfig.port,
           help=f"the port (default {ServeConfig.port}; 0: any free one, printed)")
    g = p.add_argument_group("limits and batching")
    number(g, "--max-upload-mb", float, 0, "MB", above=True, below=1025, default=ServeConfig.max_upload_mb,
           help=f"largest request body; a larger upload is refused with 413 (default {ServeConfig.max_upload_mb:g})")
    number(g, "--batch-delay-ms", float, 0, "MS", below=1001, default=ServeConfig.batch_delay_ms,
           help="how long a request waits for others to share one model call (default "
                f"{ServeConfig.batch_delay_ms:g}; 0: no batching, a model call for each request)")
    number(g, "--max-batch", int, 1, "N", below=1025,
           help="images in one model call at most (default 32, fewer for large inputs: 4 at 224x224, whose "
                "activations then stay in the CPU's caches)")
    number(g, "--top", int, 1, "K", default=ServeConfig.top,
           help=f"classes per image in an answer, unless the request asks ?top=K (default {ServeConfig.top})")
    number(g, "--threads", int, 1, "T", help="CPU threads of the model, PyTorch's or onnxruntime's (default: "
                                             "their own choice)")

"""The ``edgeopt`` command.

    edgeopt MODEL -p SPEC [-o OUT] [--calib PATH] [--report FILE] [--measure] [--layers]
    edgeopt info MODEL            inputs, outputs, opsets, ops, parameters, MACs
    edgeopt passes                every pass with its options
    edgeopt compare A B           numerical and latency comparison in ONNX Runtime
    edgeopt demo                  the headline pipeline on the bundled digits model

Every user mistake exits non-zero with one line on stderr (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from edgeopt.ir import EdgeoptError

from ._console import Console

__all__ = ["main"]

COMMANDS = ("info", "passes", "compare", "demo")
EXIT_USER, EXIT_INTERNAL = 2, 3


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress or messages")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")


def _shape_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--input-shape", metavar="NAME:DxD..",
                   help="shapes of inputs with symbolic dims besides the batch, comma-separated, "
                        f"e.g. x:1x3x640x640: {what}")


def _calib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", metavar="PATH",
                   help="calibration data: .npz, a folder of .npy/.npz/.pb or images, or "
                        "'random'")
    p.add_argument("--preprocess", metavar="SPEC",
                   help="image preprocessing, e.g. resize=32x32,layout=nchw,mean=0.5,std=0.5")
    p.add_argument("--calib-samples", type=int, metavar="N", help="use at most N samples")


def _optimize_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgeopt", description="Optimize an ONNX model with a pipeline of passes.",
        epilog="Other commands: edgeopt {info,passes,compare,demo} --help. Pipeline grammar: "
               "comma-separated 'name' or 'name:value' starting a pass, 'key=value' setting "
               "an option of the pass before it; '@file.toml' reads a file.")
    p.add_argument("model", help="input .onnx file")
    p.add_argument("-p", "--pipeline", default="simplify", metavar="SPEC",
                   help="passes to run (default: simplify), e.g. 'simplify,dce'")
    p.add_argument("-o", "--output", metavar="OUT",
                   help="output file or folder (default: MODEL.opt.onnx beside the input)")
    p.add_argument("--report", metavar="FILE", help="write the pipeline report as JSON")
    p.add_argument("--layers", action="store_true",
                   help="list every changed layer (default: the 40 biggest changes)")
    p.add_argument("--measure", action="store_true",
                   help="time the input and the optimized model in ONNX Runtime (CPU, 2 "
                        "threads, batch 1) on the same input: random, or the first --calib "
                        "sample")
    p.add_argument("--runs", type=_positive_int, default=50, metavar="N",
                   help="timed runs per model for --measure (median; default 50)")
    p.add_argument("--verify-each", action="store_true",
                   help="verify the IR after every modifying pass (default: at the end)")
    p.add_argument("--external-data", choices=("auto", "yes", "no"), default="auto",
                   help="write weights to a .data file beside the model (auto: when large or "
                        "when the input used external data)")
    p.add_argument("--emit", choices=("onnx", "c", "c-header"), default="onnx",
                   help="what to write: the optimized ONNX model (default); 'c': a C99 library "
                        "(header, weights, schedule, kernels; static arena, CRC-32 check) in "
                        "the folder -o (default MODEL_c/ beside the input); 'c-header': the "
                        "constants only, in CMSIS-NN layouts, for your own runtime")
    p.add_argument("--prefix", metavar="NAME",
                   help="C symbol and file prefix for --emit c (default: the model's file name)")
    p.add_argument("--budget", metavar="flash=SIZE,ram=SIZE",
                   help="with --emit c: fail (writing nothing) unless the constants fit flash "
                        "and the arena fits RAM, e.g. flash=256K,ram=64K")
    _shape_arg(p, "what --calib random, --measure's random input and the MAC counts run at "
                  "(default: the calibration data's shape), and the static shape of --emit c; "
                  "an ONNX output keeps its symbolic dims")
    p.add_argument("--sparse-initializers", action="store_true",
                   help="write CSR-packed weights (the csr pass) as ONNX sparse_initializer "
                        "where that is smaller; ONNX Runtime loads them (default: dense, and "
                        "the possible saving is reported)")
    _calib_args(p)
    _common(p)
    return p


def _sub_parser(cmd: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"edgeopt {cmd}")
    if cmd == "info":
        p.description = "Summarize a model: I/O, opsets, op histogram, parameters, MACs."
        p.add_argument("model")
        p.add_argument("--layers", action="store_true", help="list MACs of every layer")
        p.add_argument("--groups", action="store_true",
                       help="list the channel groups structured pruning sees, their sizes, and "
                            "why some are frozen")
        _shape_arg(p, "the shape MACs are counted at")
    elif cmd == "passes":
        p.description = "List every available pass with its options."
        p.add_argument("--plugins", action="store_true",
                       help="list the packages that provided passes")
    elif cmd == "compare":
        p.description = "Run two models in ONNX Runtime on the same inputs and compare."
        p.add_argument("a")
        p.add_argument("b")
        p.add_argument("--runs", type=_positive_int, default=20, metavar="N",
                       help="latency runs (median; default 20)")
        _calib_args(p)
        _shape_arg(p, "the shape of the random inputs (without --calib)")
    elif cmd == "demo":
        p.description = "Run the headline pipeline on the bundled digits CNN."
        p.add_argument("-o", "--output", default="edgeopt-demo", metavar="DIR")
    _common(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edgeopt`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv[0] if argv and argv[0] in COMMANDS else "optimize"
    parser = _optimize_parser() if cmd == "optimize" else _sub_parser(cmd)
    args = parser.parse_args(argv if cmd == "optimize" else argv[1:])
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="edgeopt: %(levelname)s: %(message)s")
    console = Console(quiet=args.quiet)
    try:
        from . import _commands

        return getattr(_commands, f"cmd_{cmd}")(args, console)
    except EdgeoptError as e:
        if args.debug:
            raise
        print(f"edgeopt: error: {_one_line(str(e))}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        print("edgeopt: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug in edgeopt: still one line unless --debug
        if args.debug:
            raise
        print(f"edgeopt: internal error: {type(e).__name__}: {_one_line(str(e))} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


def _one_line(msg: str) -> str:
    return " ".join(msg.split()) if msg else "(no message)"


def print_json(data: object) -> None:
    """Write JSON to stdout."""
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

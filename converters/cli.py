"""``ncps-convert``: convert ncps checkpoints (ncps.torch, ncps.keras, ncps.tf) to MLX or ONNX,
inspect them, verify parity.

    ncps-convert SRC -o OUT.safetensors|OUT.onnx [--config CFG.json]   convert (and verify)
    ncps-convert inspect SRC [--config CFG.json]                        what the checkpoint holds
    ncps-convert verify SRC OUT.safetensors|OUT.onnx                    parity tables

Exit codes: 0 success, 1 verification over tolerance, 2 unusable input or arguments.
Progress goes to stderr (silence it with --quiet); reports go to stdout (--json for CI).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from .description import ConversionError

COMMANDS = ("convert", "inspect", "verify")


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see ncps-convert --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="ncps-convert",
        description=(
            "Convert ncps checkpoints (ncps.torch state dicts, Keras 3 .keras, tf.keras .h5 and SavedModel) "
            "to ncps-mlx model files or ONNX, and check that they compute the same."
        ),
        epilog="Run 'ncps-convert COMMAND --help' for a command's options. Without a command, 'convert' is assumed.",
    )
    sub = parser.add_subparsers(dest="command", parser_class=Parser)

    def common(p, config=True):
        if config:
            p.add_argument(
                "--config",
                metavar="CFG.json",
                help="torch: constructor arguments the weights do not tell; Keras weights-only .h5: the model "
                'config; any Keras file: {"wirings": {layer: wiring}} for NCP wirings',
            )
            p.add_argument(
                "--trust-pickle",
                action="store_true",
                help="allow reading a whole pickled module (torch.save(model)); unpickling runs code from the file",
            )
        p.add_argument("--json", action="store_true", help="print a machine-readable JSON report on stdout")
        p.add_argument("--quiet", action="store_true", help="no progress messages")
        p.add_argument("--debug", action="store_true", help="show tracebacks on errors")

    convert = sub.add_parser("convert", help="convert SRC to an ncps-mlx model file")
    convert.add_argument(
        "src", metavar="SRC", help=".pt/.pth or .safetensors state dict, .keras, .h5, a SavedModel folder, or an ncps-mlx file"
    )
    convert.add_argument(
        "-o", "--output", required=True, metavar="OUT", help="what to write: an ncps-mlx model file (.safetensors) or ONNX (.onnx)"
    )
    convert.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    group = convert.add_mutually_exclusive_group()
    group.add_argument("--verify", dest="verify", action="store_const", const=True, help="verify (the default; fail if the source framework is missing)")
    group.add_argument("--no-verify", dest="verify", action="store_const", const=False, help="skip the parity check")
    convert.add_argument("--atol", type=_tolerance, default=1e-5, help=ATOL_HELP)
    convert.add_argument("--allow-nonfinite", action="store_true", help="convert a checkpoint with NaN/Inf weights anyway")
    convert.add_argument(
        "--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
        help="the model file's weights in this dtype (default float32); ncps_mlx.load builds the model in it. "
        f"A half-precision file is verified against the source's float64 run within {HALF_PRECISION_ULPS}x "
        "that dtype's epsilon times the output's scale (at least 1)",
    )
    convert.add_argument(
        "--module", metavar="NAME", help="with several ncps modules in SRC: the one to export to ONNX (a model file keeps all)"
    )
    convert.add_argument(
        "--onnx-inputs", type=_onnx_inputs, metavar="NAMES",
        help="ONNX: make these graph inputs (comma-separated: initial_state, initial_memory, timespans); "
        "by default the graph takes `input` alone",
    )
    convert.add_argument(
        "--onnx-step", action="store_true",
        help="ONNX: export one step for streaming (input, state[, memory][, timespan] -> output, next_state[, next_memory])",
    )
    common(convert)

    inspect = sub.add_parser("inspect", help="print what SRC holds and what had to be assumed")
    inspect.add_argument("src", metavar="SRC")
    common(inspect)

    verify = sub.add_parser(
        "verify", help="run SRC in its framework and OUT (MLX model file, or ONNX in onnxruntime); print parity tables"
    )
    verify.add_argument("src", metavar="SRC")
    verify.add_argument("out", metavar="OUT", help=".safetensors model file or .onnx")
    verify.add_argument("--atol", type=_tolerance, default=1e-5, help=ATOL_HELP)
    verify.add_argument("--allow-nonfinite", action="store_true", help="verify a checkpoint with NaN/Inf weights anyway")
    verify.add_argument("--module", metavar="NAME", help="with several ncps modules in SRC: the one an ONNX OUT holds")
    common(verify)
    return parser


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like Ctrl-C, so every ``finally`` removes its partial file."""


def main(argv=None) -> int:
    import signal

    def terminate(signum, frame):
        raise Terminated()

    try:  # only the main thread may set a handler; elsewhere SIGTERM keeps its default
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:
        previous = None
    try:
        return _main(argv)
    except Terminated:
        print("ncps-convert: terminated (SIGTERM); nothing was written", file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv.insert(0, "convert")
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            raise UsageError("give a command or a checkpoint (see ncps-convert --help)")
        return {"convert": cmd_convert, "inspect": cmd_inspect, "verify": cmd_verify}[args.command](args)
    except UsageError as error:
        return _fail(error, debug)
    except (ConversionError, ValueError, OSError) as error:
        return _fail(error, debug)
    except Exception as error:  # a bug of ours: still one line, the traceback with --debug
        return _fail(f"internal error: {type(error).__name__}: {error} (run with --debug for the traceback)", debug)
    except KeyboardInterrupt:
        print("ncps-convert: interrupted; nothing was written", file=sys.stderr)
        return 130


HALF_PRECISION_ULPS = 8  # converters.verify's, not imported here: --help stays fast

ATOL_HELP = (
    "absolute floor of the parity tolerance (default 1e-5). Each output is judged against the source "
    "run in float64: it passes within --atol or within 4x the source's own float32 error (float32 "
    "round-off grows with wide inputs and large weights; a wrong weight is orders of magnitude "
    "over). Where the source cannot run in float64, against its float32 run within --atol."
)


def _fail(error, debug) -> int:
    if debug:
        traceback.print_exc()
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    print(f"ncps-convert: error: {message}", file=sys.stderr)
    return 2


def _progress(args):
    if args.quiet or args.json:
        return lambda message: None
    return lambda message: print(f"[INFO] {message}", file=sys.stderr, flush=True)


def _read(args, progress):
    from . import readers
    from .description import load_user_config

    config = load_user_config(args.config) if getattr(args, "config", None) else None
    progress(f"Reading {args.src}")
    checkpoint = readers.read(args.src, config=config, trust_pickle=getattr(args, "trust_pickle", False))
    if checkpoint.source.get("renamed_layers"):
        progress(f"Layers of the config matched to the file's by Keras's numbering, in topology order: {checkpoint.source['renamed_layers']}")
    if checkpoint.source.get("written_by"):
        progress(f"Written with {checkpoint.source['written_by']}; verified with {checkpoint.source['verified_with']}")
    return checkpoint


def nonfinite_tensors(checkpoint) -> dict[str, int]:
    """{tensor name (as the checkpoint names it): how many NaN/Inf values} over every module
    and every other tensor."""
    import numpy as np

    found = {}
    for name, description in checkpoint.modules.items():
        prefix = f"{name}." if name else ""
        arrays = description.source_arrays or description.arrays
        for key, array in arrays.items():
            values = np.asarray(array.detach().float().numpy() if hasattr(array, "detach") else array)
            if values.dtype.kind == "f" and (bad := int(values.size - np.count_nonzero(np.isfinite(values)))):
                found[prefix + key] = bad
    for key, array in checkpoint.other.items():
        if array.dtype.kind == "f" and (bad := int(array.size - np.count_nonzero(np.isfinite(array)))):
            found[key] = bad
    return found


def _refuse_nonfinite(checkpoint, args) -> None:
    found = nonfinite_tensors(checkpoint)
    if found and not getattr(args, "allow_nonfinite", False):
        listed = ", ".join(f"{k} ({v} value{'s' if v > 1 else ''})" for k, v in list(found.items())[:5])
        more = f" and {len(found) - 5} more" if len(found) > 5 else ""
        raise UsageError(
            f"{args.src}: {len(found)} tensor(s) hold NaN or Inf values: {listed}{more}. The checkpoint itself is broken "
            "(e.g. a diverged training run), not the conversion; pass --allow-nonfinite to convert it anyway"
        )


def _write_model_file(checkpoint, models, path, args):
    from . import modelfile

    modelfile.save_modules(models, path, source=checkpoint.source, other=checkpoint.other, dtype=args.dtype)


def _write_onnx(checkpoint, models, path, args):
    from .onnx_export import export_onnx

    (model,) = models.values()
    try:
        export_onnx(model, path, inputs=args.onnx_inputs or (), step=args.onnx_step)
    except ValueError as error:
        raise UsageError(f"--onnx-inputs/--onnx-step: {error}") from None


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"--atol must be a finite number >= 0, got {text!r}")
    return value


def _onnx_inputs(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    allowed = ("initial_state", "initial_memory", "timespans")
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown input(s) {', '.join(unknown)}; choose from {', '.join(allowed)}")
    return names


# The table of writers, by the output's suffix.
WRITERS = {".safetensors": _write_model_file, ".onnx": _write_onnx}


def _modules_written(checkpoint, args, suffix) -> list[str]:
    """A model file keeps every module; an ONNX file holds one (--module picks it)."""
    if suffix == ".onnx":
        return [checkpoint.module(getattr(args, "module", None)).source["module"]]
    if getattr(args, "module", None) is not None:
        raise UsageError("--module applies to ONNX output; a model file keeps every module")
    return list(checkpoint.modules)


def cmd_convert(args) -> int:
    from .verify import verify_output

    progress = _progress(args)
    out = Path(args.output)
    if out.suffix not in WRITERS:
        raise UsageError(f"output {out} must end in {' or '.join(WRITERS)}")
    _check_output_path(out)
    if out.exists() and not args.force:
        raise UsageError(f"{out} exists; pass --force to overwrite it")
    if out.suffix == ".onnx" and args.dtype != "float32":
        raise UsageError("--dtype applies to model files; ONNX output is float32")
    if out.suffix != ".onnx" and (args.onnx_inputs or args.onnx_step):
        raise UsageError("--onnx-inputs and --onnx-step apply to ONNX output (-o OUT.onnx)")
    checkpoint = _read(args, progress)
    _refuse_nonfinite(checkpoint, args)
    for note in checkpoint.notes:
        progress(note[:1].upper() + note[1:])
    names = _modules_written(checkpoint, args, out.suffix)
    models = {}
    for name in names:
        description = checkpoint.modules[name]
        progress(f"Building {_module_label(name)}{description.model_class} ({_size_line(description)})")
        models[name] = description.build()
    if checkpoint.other and out.suffix == ".safetensors":
        groups = checkpoint.other_groups()
        progress(f"Keeping {len(checkpoint.other)} other tensors as they are ({', '.join(groups)})")

    # Written next to the output under a hidden name, checked, then renamed: a failed
    # verification or an error never leaves a (partial) output file behind.
    partial = out.with_name(f".{out.stem}.partial-{os.getpid()}{out.suffix}")
    try:
        progress(f"Writing {'ONNX' if out.suffix == '.onnx' else 'the model file'}")
        try:
            WRITERS[out.suffix](checkpoint, models, partial, args)
        except OSError as error:
            raise UsageError(f"writing {out} failed: {error.strerror or error}; nothing was written") from None
        reports = []
        if args.verify is not False:
            for name in names:
                progress(f"Verifying {_module_label(name)}".rstrip(": "))
                reports += verify_output(
                    checkpoint.modules[name], partial, atol=args.atol, require_source=bool(args.verify),
                    progress=progress, model=models[name],
                )
            for report in reports:
                report.target = report.target.replace(partial.name, out.name)
        passed = all(r.passed for r in reports)
        if passed:
            os.replace(partial, out)
            progress(f"Wrote {out}")
    finally:
        partial.unlink(missing_ok=True)
    _print_reports(args, reports, extra={"written": passed, "output": str(out), "verified": bool(reports)})
    if not passed:
        print(f"ncps-convert: verification failed; {out} not written (--no-verify writes it anyway)", file=sys.stderr)
        return 1
    return 0


def _check_output_path(out: Path) -> None:
    """What is wrong with the output path, said before anything is read or written."""
    for parent in [out.parent, *out.parent.parents]:
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"output folder {parent} is a file, not a folder")
        if parent.exists():
            break
    if not out.parent.exists():
        raise UsageError(f"output folder {out.parent} does not exist")
    if out.is_dir():
        raise UsageError(f"output {out} is a folder; give a file name ending in .safetensors or .onnx")
    if not os.access(out.parent, os.W_OK):
        raise UsageError(f"output folder {out.parent} is not writable")


def _module_label(name: str) -> str:
    return f"module {name!r}: " if name else ""


def cmd_verify(args) -> int:
    from .verify import verify_output

    progress = _progress(args)
    checkpoint = _read(args, progress)
    _refuse_nonfinite(checkpoint, args)
    out = Path(args.out)
    if out.suffix not in WRITERS:
        raise UsageError(f"{args.out}: expected a {' or '.join(WRITERS)} file")
    if not out.exists():
        raise UsageError(f"{args.out}: no such file")
    reports = []
    for name in _modules_written(checkpoint, args, out.suffix):
        reports += verify_output(checkpoint.modules[name], out, atol=args.atol, require_source=True, progress=progress)
    _print_reports(args, reports)
    return 0 if all(r.passed for r in reports) else 1


def _print_reports(args, reports, extra=None):
    if args.json:
        print(json.dumps({"passed": all(r.passed for r in reports), "reports": [r.to_dict() for r in reports], **(extra or {})}, indent=2))
    else:
        for report in reports:
            print(report.table())


def _size_line(description) -> str:
    return summarize(description.config)


def summarize(config) -> str:
    """One line: "input 4, state 8" for a model; its layers, inputs and outputs for a Graph."""
    if config["class"] in ("Graph", "Stack"):
        from ncps_mlx.graph import graph_from_config

        config = graph_from_config(config).get_config() if config["class"] == "Stack" else config
        kinds = [_layer_summary(config["layers"][call["layer"]]) for call in config["calls"]]
        return ", ".join(kinds) if len(kinds) <= 12 else f"{len(kinds)} layer calls"
    units = config["units"]
    state = units.get("exact", units).get("units") if isinstance(units, dict) else units
    return f"input {config['input_size']}, state {state}"


def _layer_summary(layer) -> str:
    kind = layer["type"]
    if kind == "RNN":
        return f"{layer['model']['class']}({summarize(layer['model'])})"
    if kind == "Bidirectional":
        return f"Bidirectional({layer['forward']['class']}, {layer['merge_mode']})"
    if kind == "TimeDistributed":
        return f"TimeDistributed({_layer_summary(layer['layer'])})"
    if kind == "Dense":
        return f"Dense({layer['units']}{', ' + layer['activation'] if layer['activation'] else ''})"
    if kind in ("Conv", "Pooling", "GlobalPooling", "Merge", "Identity"):
        return layer.get("kind", kind)
    return kind


def cmd_inspect(args) -> int:
    checkpoint = _read(args, _progress(args))
    modules = [_module_info(name, description) for name, description in checkpoint.modules.items()]
    other = {
        group: {"tensors": len(names), "values": int(sum(checkpoint.other[n].size for n in names))}
        for group, names in checkpoint.other_groups().items()
    }
    source = checkpoint.source
    info = {
        "file": source.get("file"),
        "framework": source.get("framework"),
        "format": source.get("format"),
        "stored_dtype": source.get("stored_dtype"),
        "sha256": source.get("sha256"),
        "notes": checkpoint.notes,
        "modules": modules,
        "other_tensors": other,
        "nonfinite": nonfinite_tensors(checkpoint),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"file         {info['file']}  (sha256 {info['sha256'][:16]}...)")
    print(f"framework    {info['framework']}, {info['format']}")
    if info["stored_dtype"]:
        widened = "" if info["stored_dtype"].startswith("float32") else " (converted to float32 exactly)"
        print(f"dtype        {info['stored_dtype']}{widened}")
    for note in checkpoint.notes:
        print(f"note         {note}")
    if len(modules) > 1 or modules[0]["name"]:
        print(f"modules      {len(modules)} ncps module(s): {', '.join(m['name'] or repr('') for m in modules)}")
    for entry in modules:
        _print_module(entry)
    for group, counts in other.items():
        print(f"other        {group}.*: {counts['tensors']} tensors, {counts['values']:,} values (kept as they are)")
    for name, count in info["nonfinite"].items():
        print(f"NaN/Inf      {name}: {count:,} values (convert refuses this checkpoint unless --allow-nonfinite)")
    return 0


def _module_info(name, description) -> dict:
    from mlx.utils import tree_flatten

    from .verify import input_size_of

    model = description.build()
    params = dict(tree_flatten(model.parameters()))
    trainable = dict(tree_flatten(model.trainable_parameters()))
    graph = description.model_class == "Graph"
    recurrent = [layer.model for layer in model.rnn_layers] if graph else [model]
    info = {
        "name": name,
        "model_class": description.model_class,
        "summary": summarize(description.config),
        "recurrent": [{"class": type(m).__name__, "state_size": m.state_size, "wiring": _wiring_info(m)} for m in recurrent],
        "parameters": int(sum(v.size for v in trainable.values())),
        "fixed_arrays": int(sum(v.size for k, v in params.items() if k not in trainable)),
        "inferred": _plain(description.inferred),
        "from_config": _plain(description.given),
        "defaulted": _plain(description.defaulted),
        "notes": description.notes,
    }
    if graph:
        info["inputs"], info["outputs"] = _graph_shapes(model, description.config)
    else:
        info["input_size"] = input_size_of(description.config)
        info["output_size"] = _output_features(model, info["input_size"])
    return info


def _graph_shapes(model, config):
    """Inputs and outputs of a Graph with their shapes (None: batch, or a size left free)."""
    import mlx.core as mx
    import numpy as np

    from .verify import graph_inputs

    inputs = [{"name": spec["name"], "shape": [None] + list(spec.get("shape") or [None, None])} for spec in config["inputs"]]
    one = model(*[mx.array(x) for x in graph_inputs(config, 1, 5, np.random.default_rng(0))])
    another = model(*[mx.array(x) for x in graph_inputs(config, 2, 6, np.random.default_rng(0))])
    one, another = (v if isinstance(v, list) else [v] for v in (one, another))
    outputs = [
        {"name": name, "shape": [a if a == b else None for a, b in zip(x.shape, y.shape)]}
        for name, x, y in zip(model.output_names, one, another)
    ]
    return inputs, outputs


def _shapes(entries) -> str:
    return ", ".join(f"{e['name']} ({', '.join('?' if d is None else str(d) for d in e['shape'])})" for e in entries)


def _print_module(info) -> None:
    if info["name"]:
        print(f"module       {info['name']!r}")
    graph = info["model_class"] == "Graph"
    if graph:
        print(f"model        Graph: {info['summary']}")
        print(f"inputs       {_shapes(info['inputs'])}")
        print(f"outputs      {_shapes(info['outputs'])}")
    else:
        state = info["recurrent"][0]["state_size"]
        print(f"model        {info['model_class']}: input {info['input_size']}, state {state}, output {info['output_size']}")
    for entry in info["recurrent"]:
        wiring = entry["wiring"]
        if wiring:
            layers = " / ".join(str(n) for n in wiring["neurons_per_layer"])
            text = (
                f"{wiring['kind']}: neurons per layer {layers}, {wiring['synapses']} synapses, "
                f"{wiring['sensory_synapses']} sensory synapses"
            )
        else:
            text = f"none (fully connected {entry['class']})"
        print(f"wiring       {text}" + (f" ({entry['class']} layer)" if graph else ""))
    print(f"parameters   {info['parameters']:,} trainable, {info['fixed_arrays']:,} fixed (masks, statistics)")
    for title, key in (("inferred", "inferred"), ("from config", "from_config"), ("defaulted", "defaulted")):
        values = info[key]
        text = ", ".join(f"{k}={v}" for k, v in values.items()) if values else "-"
        print(f"{title:<12} {text}")
    for note in info["notes"]:
        print(f"note         {note}")


def _output_features(model, input_size: int) -> int:
    """Features the model really returns (proj_size, motor slicing and all)."""
    import mlx.core as mx

    output, _ = model(mx.zeros((1, 1, input_size)))  # (1, 1, F) in either layout
    return int(output.shape[-1])


def _wiring_info(model):
    wiring = getattr(model, "wiring", None)
    if wiring is None:
        return None
    return {
        "kind": type(wiring).__name__,
        "neurons_per_layer": [len(wiring.get_neurons_of_layer(i)) for i in range(wiring.num_layers)],
        "synapses": wiring.synapse_count,
        "sensory_synapses": wiring.sensory_synapse_count,
        "motor_neurons": wiring.output_dim,
    }


def _plain(values: dict) -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and "exact" in value:
            value = f"{value.get('class', 'wiring')}({value['exact']['units']} neurons)"
        elif isinstance(value, dict):
            args = ", ".join(f"{k}={v}" for k, v in value.items() if k != "class")
            value = f"{value.get('class', 'wiring')}({args})"
        out[key] = value
    return out


if __name__ == "__main__":
    sys.exit(main())

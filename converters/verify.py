"""Run the source in its own framework and the converted model on the same inputs; tabulate.

A runner takes a list of ``(x, hx, timespans)`` numpy inputs and returns, per input, a dict of
named results ("output", "state" or "state h"/"state c", ...). The source's runner comes from
the reader that read it (its ``run_source``, which raises ``SourceUnavailable`` when the
framework is not installed); ``mlx_runner`` and ``onnx_runner`` run what we wrote.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .description import ConversionError, Description

DEFAULT_ATOL = 1e-5
# A float32 conversion passes where its error against the exact (float64) answer is within
# --atol or within this multiple of the reference's own float32 error: two float32
# implementations of one function differ only in the order of their roundings, which moves the
# error by a small factor, while a wrong weight or a swapped head is off by orders of magnitude.
REFERENCE_ERROR_MULTIPLE = 4.0
# A half-precision model file is judged against the float64 answer alone: within this many units
# of that dtype's rounding (its machine epsilon), relative to the output's scale (at least 1).
# Measured over 32 steps on CfC, wired CfC, LTC, CTRNN and CTGRU: at most 1.3 (tests/test_precision.py).
HALF_PRECISION_ULPS = 8
EPSILON = {"float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}


class SourceUnavailable(RuntimeError):
    """The source's framework is not installed, so it cannot be run."""


@dataclass
class Check:
    case: str
    tensor: str
    shape: tuple
    max_abs: float  # target vs the reference run in float32
    max_rel: float
    atol: float
    ok: bool
    error_vs_float64: float | None = None  # target vs the reference run in float64
    reference_error_vs_float64: float | None = None  # the reference's float32 run vs its float64 run
    tolerance: float | None = None  # what error_vs_float64 was held to


@dataclass
class Report:
    source: str
    target: str
    atol: float
    checks: list[Check]
    rule: str = ""  # how a check decides, in words

    @property
    def passed(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "target": self.target,
            "atol": self.atol,
            "rule": self.rule,
            "passed": self.passed,
            "checks": [asdict(c) for c in self.checks],
        }

    def table(self) -> str:
        exact = any(c.error_vs_float64 is not None for c in self.checks)
        header = f"{'case':<30} {'tensor':<8} {'shape':<14} {'max abs':>9} {'max rel':>9}"
        header += f" {'vs f64':>9} {'ref vs f64':>10} {'tolerance':>9}  result" if exact else f" {'atol':>8}  result"
        lines = [f"Parity: {self.source}  vs  {self.target}", header, "-" * len(header)]
        for c in self.checks:
            line = f"{c.case:<30} {c.tensor:<8} {str(tuple(c.shape)):<14} {c.max_abs:>9.2e} {c.max_rel:>9.2e}"
            if exact:
                line += f" {_number(c.error_vs_float64):>9} {_number(c.reference_error_vs_float64):>10} {_number(c.tolerance):>9}"
            else:
                line += f" {c.atol:>8.0e}"
            lines.append(f"{line}  {'pass' if c.ok else 'FAIL'}")
        failed = sum(not c.ok for c in self.checks)
        verdict = "PASSED" if not failed else f"FAILED ({failed} over tolerance)"
        within = self.rule if self.rule else f"within atol {self.atol:g}"
        lines.append(f"{verdict}: {len(self.checks) - failed}/{len(self.checks)} checks {within}")
        return "\n".join(lines)


def _number(value) -> str:
    return "-" if value is None else f"{value:.2e}"


def rule_text(atol, dtype="float32") -> str:
    if dtype != "float32":
        return (f"within {HALF_PRECISION_ULPS} x {dtype}'s epsilon ({EPSILON[dtype]:.1e}) x max(1, |output|) "
                f"or atol {atol:g} of the float64 reference")
    return (f"within atol {atol:g} or {REFERENCE_ERROR_MULTIPLE:g}x the reference's own float32 error, "
            "both against the reference run in float64")


def cases(description: Description | None = None, unbatched: bool = True):
    """(name, batch or None for unbatched, steps, timespans?, initial state?) to run."""
    if description is not None and description.model_class == "Graph":
        # A Keras model takes its inputs alone: no initial state, no timespans. A time length
        # the model declares is used as declared (graph_inputs).
        return [("B=1", 1, 7, False, False), ("B=4", 4, 13, False, False), ("B=3", 3, 32, False, False)]
    # ncps.torch handles per-step timespans only for batch 1 (reference-notes point 7).
    per_sample_ts = description is None or description.source.get("framework") != "torch"
    chosen = [
        ("B=1 T=7 random timespans", 1, 7, True, False),
        (f"B=4 T=13{' random timespans' if per_sample_ts else ''}", 4, 13, per_sample_ts, False),
        ("B=3 T=32 random initial state", 3, 32, False, True),
    ]
    if unbatched:
        chosen.append(("unbatched T=9", None, 9, False, False))
    return chosen


def make_inputs(config, case_list, state_size, seed=0):
    """[(x, hx, timespans)] for each case, drawn from one seeded generator; for a Graph,
    [(xs, None, None)] with one array per graph input."""
    rng = np.random.default_rng(seed)
    if config.get("class") == "Graph":
        return [(graph_inputs(config, batch, steps, rng), None, None) for _, batch, steps, _, _ in case_list]
    batch_first = config.get("batch_first", True)
    inputs = []
    for _, batch, steps, with_ts, with_hx in case_list:
        shape = (steps, config["input_size"]) if batch is None else (batch, steps, config["input_size"])
        x = rng.normal(size=shape).astype(np.float32)
        if batch is not None and not batch_first:
            x = np.ascontiguousarray(x.swapaxes(0, 1))
        ts = None
        if with_ts:
            ts = rng.uniform(0.2, 2.0, size=(batch, steps)).astype(np.float32)
            ts = ts if batch_first else np.ascontiguousarray(ts.T)
        hx = None
        if with_hx:
            states = [rng.normal(scale=0.5, size=(batch, state_size)).astype(np.float32)]
            if config.get("mixed_memory"):
                states.append(rng.normal(scale=0.5, size=(batch, state_size)).astype(np.float32))
            hx = tuple(states) if config.get("mixed_memory") else states[0]
        inputs.append((x, hx, ts))
    return inputs


def compare(config, reference, reference_name, target, target_name, case_list, *, state_size, atol, seed=0,
            progress=None, exact=None, dtype="float32"):
    """Run two implementations on the same random inputs; one Check per tensor and case.

    ``reference`` and ``target`` take a list of (x, hx, timespans) and return, per input, a
    dict of named result arrays ("output", "state", ...). ``exact``, where given, runs the
    reference in float64: each check is then decided against it (``rule_text``); without it,
    by ``atol`` against the float32 reference. ``dtype``: the target's precision.
    """
    inputs = make_inputs(config, case_list, state_size, seed)
    if progress:
        progress(f"running {reference_name} on {len(inputs)} input sets")
    expected = reference(inputs)
    exact_results = None
    if exact is not None:
        if progress:
            progress("running it again in float64")
        try:
            exact_results = exact(inputs)
        except SourceUnavailable as error:
            if progress:
                progress(f"No float64 run ({error}): checks hold to --atol against the float32 run")
    if progress:
        progress(f"running {target_name}")
    got = target(inputs)
    checks = []
    for index, ((name, *_), e, g) in enumerate(zip(case_list, expected, got)):
        for tensor, value in e.items():
            oracle = None if exact_results is None else exact_results[index].get(tensor)
            checks.append(_compare(name, tensor, value, g.get(tensor), atol, oracle, dtype))
    rule = rule_text(atol, dtype) if exact_results is not None else ""
    return Report(source=reference_name, target=target_name, atol=atol, checks=checks, rule=rule)


def graph_inputs(config, batch, steps, rng) -> list:
    """One array per graph input, of the shape the model declares: its first free axis is
    time (``steps`` long), any other free axis 8; integer inputs (for an Embedding) are ids
    below the vocabulary size of the Embedding that reads them."""
    xs = []
    for k, spec in enumerate(config["inputs"]):
        declared = spec.get("shape")
        if declared is None:
            declared = [None, _first_layer_inputs(config)]
        free = [i for i, d in enumerate(declared) if d is None]
        shape = [batch] + [steps if i == (free[0] if free else -1) else (8 if d is None else int(d)) for i, d in enumerate(declared)]
        readers = _layers_reading(config, k)
        padding = _padding_value(readers)
        if str(spec.get("dtype", "float32")).startswith(("int", "uint")):
            vocabulary = next((int(r["input_dim"]) for r in readers if r["type"] == "Embedding"), 2)
            x = rng.integers(0 if padding is None else 1, vocabulary, size=shape).astype(np.int32)
        else:
            x = rng.normal(size=shape).astype(np.float32)
        if padding is not None and x.ndim >= 2:
            # Padded as users pad: sample b loses its last b steps, odd samples also step 1.
            for b in range(1, batch):
                x[b, max(1, x.shape[1] - b) :] = padding
                if b % 2:
                    x[b, 1] = padding
        xs.append(x)
    return xs


def _layers_reading(config, k) -> list:
    """The configs of the layers called on graph input k."""
    return [config["layers"][call["layer"]] for call in config["calls"] if ["input", k] in call["inputs"]]


def _padding_value(layers):
    """The value that masks a step for these layers (a Masking, an Embedding(mask_zero)), or None."""
    for layer in layers:
        if layer["type"] == "Masking":
            return layer["mask_value"]
        if layer["type"] == "Embedding" and layer.get("mask_zero"):
            return 0
    return None


def _first_layer_inputs(config) -> int:
    first = config["layers"][0]
    while first["type"] == "TimeDistributed":
        first = first["layer"]
    for key in ("in_features", "features", "in_channels"):
        if key in first:
            return int(first[key])
    model = first.get("model") or first.get("forward")
    if model:
        return int(model["input_size"])
    raise ConversionError("cannot tell the input size of this graph: its input declares no shape")


def input_size_of(config) -> int:
    """Input features of a model, or of a Graph's first input."""
    if config.get("class") != "Graph":
        return config["input_size"]
    shape = config["inputs"][0].get("shape")
    return int(shape[-1]) if shape and shape[-1] is not None else _first_layer_inputs(config)


def graph_results(names, outputs) -> dict:
    """A graph's outputs by name (a chain's: output, state_0, ...)."""
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    if len(outputs) != len(names):
        raise ConversionError(f"the model returned {len(outputs)} outputs, expected {len(names)} ({', '.join(names)})")
    return {name: np.array(value) for name, value in zip(names, outputs)}


def named_results(output, state=None) -> dict:
    """The standard names: output, state (or state h / state c)."""
    results = {"output": np.array(output)}
    if isinstance(state, tuple):
        results.update({"state h": np.array(state[0]), "state c": np.array(state[1])})
    elif state is not None:
        results["state"] = np.array(state)
    return results


def _gap(expected, got) -> np.ndarray:
    expected, got = np.asarray(expected, dtype=np.float64), np.asarray(got, dtype=np.float64)
    # NaN where both have NaN (a checkpoint converted with --allow-nonfinite) counts as equal.
    gap = np.where(np.isnan(expected) & np.isnan(got), 0.0, np.abs(expected - got))
    return np.where(np.isinf(expected) & (expected == got), 0.0, gap)


def _compare(case, tensor, expected, got, atol, exact=None, dtype="float32") -> Check:
    expected = np.asarray(expected, dtype=np.float64)
    if got is None or np.shape(got) != expected.shape:
        return Check(case, tensor, tuple(expected.shape), float("inf"), float("inf"), atol, False)
    gap = _gap(expected, got)
    diff = float(np.max(gap)) if expected.size else 0.0
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    check = Check(case, tensor, tuple(expected.shape), diff, diff / scale if scale > 0 else diff, atol, diff <= atol)
    if exact is None or np.shape(exact) != expected.shape or not expected.size:
        if dtype != "float32":  # no float64 run: a half-precision target is held to its own rounding
            check.tolerance = max(atol, HALF_PRECISION_ULPS * EPSILON[dtype] * max(1.0, scale))
            check.ok = diff <= check.tolerance
        return check
    check.error_vs_float64 = float(np.max(_gap(exact, got)))
    check.reference_error_vs_float64 = float(np.max(_gap(exact, expected)))
    if dtype == "float32":
        check.tolerance = max(atol, REFERENCE_ERROR_MULTIPLE * check.reference_error_vs_float64)
    else:
        exact_scale = float(np.max(np.abs(np.asarray(exact, dtype=np.float64))))
        check.tolerance = max(atol, HALF_PRECISION_ULPS * EPSILON[dtype] * max(1.0, exact_scale))
    check.ok = check.error_vs_float64 <= check.tolerance
    return check


def _source_name(description: Description) -> str:
    source = description.source
    module = f", module {source['module']}" if source.get("module") else ""
    reference = f"; written with {source['written_by']}, run with {source['verified_with']}" if source.get("written_by") else ""
    return f"{source.get('framework')} ({source.get('file')}{module}{reference})"


def mlx_runner(model, dtype: str = "float32"):
    """Runs an ncps_mlx model (or Graph) over a list of (x, hx, timespans); ``dtype``: the
    floating inputs cast to it (a half-precision model computes in its own dtype)."""
    import mlx.core as mx

    def array(value):
        value = mx.array(value)
        return value.astype(getattr(mx, dtype)) if mx.issubdtype(value.dtype, mx.floating) else value

    def run(inputs):
        results = []
        for x, hx, ts in inputs:
            if hasattr(model, "output_names"):  # a Graph
                outputs = model(*[array(v) for v in x])
                outputs = [o.astype(mx.float32) for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs])]
                results.append(graph_results(model.output_names, outputs))
                continue
            hx_m = None if hx is None else (tuple(array(h) for h in hx) if isinstance(hx, tuple) else array(hx))
            out, state = model(array(x), hx_m, None if ts is None else array(ts))
            widen = lambda v: v.astype(mx.float32)  # noqa: E731  (numpy has no bfloat16)
            results.append(named_results(widen(out), tuple(map(widen, state)) if isinstance(state, tuple) else widen(state)))
        return results

    return run


# --- source runners --------------------------------------------------------------------------


def _cached(run):
    """``run`` remembering its last answer: both reports ask the float64 run the same inputs."""
    memory = {}

    def cached(inputs):
        key = tuple(id(x) for item in inputs for x in item)
        if memory.get("key") != key:
            memory.update(key=key, value=run(inputs))
        return memory["value"]

    return cached


def source_runner(description: Description, float64: bool = False):
    """The reader that produced ``description`` knows how to run its source: ``run_source``
    (``float64``: in float64, or ``SourceUnavailable`` where it cannot)."""
    from .readers import reader_modules

    name = description.source.get("reader")
    for module in reader_modules():
        if module.NAME == name:
            return module.run_source(description, float64=True) if float64 else module.run_source(description)
    raise ConversionError(f"cannot run a {description.source.get('framework')} source to verify against")


def _onnx_session(path):
    try:
        import onnxruntime as ort
    except ImportError:
        raise SourceUnavailable("verifying an ONNX file needs onnxruntime: pip install 'ncps-mlx[onnx]'") from None
    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:
        raise ConversionError(f"{path}: onnxruntime cannot load it ({str(error).splitlines()[0]})") from None


def onnx_cases(session, case_list):
    """The cases an ONNX session can take: initial states and timespans only where it has
    them as inputs (the step graph always takes a state)."""
    names = {i.name for i in session.get_inputs()}
    mixed = bool({o.name for o in session.get_outputs()} & {"memory", "next_memory"})
    has_state = "state" in names or ("initial_state" in names and (not mixed or "initial_memory" in names))
    has_ts = bool(names & {"timespans", "timespan"})
    fitted = []
    for label, batch, steps, with_ts, with_hx in case_list:
        if (with_ts and not has_ts) or (with_hx and not has_state):
            label = f"B={batch} T={steps}" + (" random timespans" if with_ts and has_ts else "")
            label += " random initial state" if with_hx and has_state else ""
        fitted.append((label, batch, steps, with_ts and has_ts, with_hx and has_state))
    return fitted


def onnx_runner(session, path):
    """``run(inputs)`` through an onnxruntime session of an exported model: a sequence graph
    fed by name, a step graph fed step by step from the initial state, or a Keras graph."""
    import json

    names = [o.name for o in session.get_outputs()]
    inputs_meta = session.get_inputs()
    input_names = [i.name for i in inputs_meta]
    step_graph = "state" in input_names
    exported = json.loads(session.get_modelmeta().custom_metadata_map.get("ncps_mlx_config", "{}"))
    batch_first, return_sequences = exported.get("batch_first", True), exported.get("return_sequences", True)

    def run_session(feeds):
        try:
            return dict(zip(names, session.run(None, feeds)))
        except Exception as error:
            message = " ".join(str(error).split())[:300]
            raise ConversionError(f"{path}: onnxruntime rejected the inputs ({message})") from None

    def run_one(x, hx, ts):
        if isinstance(x, list):  # a Graph: one array per input, its outputs by name
            outputs = run_session(dict(zip(input_names, x)))
            return graph_results(names, [outputs[n] for n in names])
        h, c = hx if isinstance(hx, tuple) else (hx, None)
        if step_graph:
            return run_steps(np.asarray(x, np.float32), h, c, ts)
        x = np.asarray(x, np.float32)
        feeds = {"input": x}
        batch_axis = 0 if batch_first else 1
        size, steps = x.shape[batch_axis], x.shape[1 - batch_axis]
        state_size = int(session.get_outputs()[1].shape[1])
        # Every graph input is required: where a case has none, the defaults the model uses.
        defaults = {"initial_state": np.zeros((size, state_size), np.float32),
                    "initial_memory": np.zeros((size, state_size), np.float32),
                    "timespans": np.ones((size, steps) if batch_axis == 0 else (steps, size), np.float32)}
        for name, value in (("initial_state", h), ("initial_memory", c), ("timespans", ts)):
            if name in input_names:
                feeds[name] = defaults[name] if value is None else np.asarray(value, np.float32)
        results = run_session(feeds)
        state = (results["state"], results["memory"]) if "memory" in results else results["state"]
        return named_results(results["output"], state)

    def run_steps(x, h, c, ts):
        xs = x if batch_first else x.swapaxes(0, 1)  # (B, T, I)
        batch, steps = xs.shape[:2]
        state = {"state": h if h is not None else np.zeros((batch, int(inputs_meta[1].shape[1])), np.float32)}
        if "memory" in input_names:
            state["memory"] = c if c is not None else np.zeros_like(state["state"])
        spans = np.ones((batch, steps), np.float32) if ts is None else (ts if batch_first else ts.T)
        outs = []
        for t in range(steps):
            feeds = {"input": np.ascontiguousarray(xs[:, t]), **state}
            if "timespan" in input_names:
                feeds["timespan"] = np.ascontiguousarray(spans[:, t])
            results = run_session(feeds)
            outs.append(results["output"])
            state = {"state": results["next_state"]}
            if "memory" in input_names:
                state["memory"] = results["next_memory"]
        if return_sequences:
            output = np.stack(outs, axis=1 if batch_first else 0)
        else:
            output = outs[-1]
        final = (state["state"], state["memory"]) if "memory" in state else state["state"]
        return named_results(output, final)

    return lambda inputs: [run_one(*args) for args in inputs]


def _check_onnx_matches(path, description, model):
    """The ONNX file's own config (metadata_props) must be a model of the source's shape."""
    try:
        import onnx
    except ImportError:
        raise SourceUnavailable("reading an ONNX file needs onnx: pip install 'ncps-mlx[onnx]'") from None
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as error:
        raise ConversionError(f"{path}: not a readable ONNX file ({str(error).splitlines()[0]})") from None
    props = {p.key: p.value for p in proto.metadata_props}
    if "ncps_mlx_config" not in props:
        raise ConversionError(f"{path}: no ncps_mlx_config metadata; not an ONNX file exported by ncps-mlx")
    import json

    config = json.loads(props["ncps_mlx_config"])
    exported = _model_summary(config)
    expected = _model_summary(description.config)
    if exported != expected:
        raise ConversionError(f"{path} holds a {exported} but the source holds a {expected}")


def _model_summary(config) -> str:
    if config["class"] in ("Graph", "Stack"):
        kinds = [layer["model"]["class"] if layer["type"] == "RNN" else layer["type"] for layer in config["layers"]]
        return f"graph of {', '.join(kinds)} with inputs {[i.get('shape') for i in config.get('inputs', [])]}"
    units = config["units"]
    size = units.get("exact", units).get("units") if isinstance(units, dict) else units
    return f"{config['class']} with input_size {config['input_size']} and {size} units"


def verify_output(description: Description, path, *, atol=DEFAULT_ATOL, require_source=True, progress=None, model=None):
    """Reports comparing a written file (model file or ONNX) with the source, and an ONNX file
    also with the MLX model converted from the same source."""
    from . import modelfile

    path = Path(path)
    model = model if model is not None else description.build()
    log = progress or (lambda message: None)
    common = dict(state_size=getattr(model, "state_size", 0), atol=atol, progress=progress)
    config = description.config
    if path.suffix == ".onnx":
        _check_onnx_matches(path, description, model)
        session = _onnx_session(path)
        case_list = onnx_cases(session, cases(description, unbatched=False))
        target, target_name = onnx_runner(session, path), f"onnxruntime ({path.name})"
    else:
        name = description.source.get("module")
        try:
            names = list(modelfile.read_metadata(path)["modules"])
            # A file holding one module answers for the source's module of any name.
            loaded = modelfile.load(path, module=None if len(names) == 1 else name)
        except modelfile.ModelFileError as error:
            raise ConversionError(str(error)) from None
        if loaded.get_config().get("class") != description.model_class:
            raise ConversionError(
                f"{path} holds a {loaded.get_config().get('class')} but the source holds a {description.model_class}"
            )
        label = f"{path.name}, module {name}" if name else path.name
        dtype = modelfile.read_metadata(path).get("dtype", "float32")
        if dtype != "float32":
            label += f", {dtype}"
            common["dtype"] = dtype
        target, target_name, case_list = mlx_runner(loaded, dtype), f"ncps_mlx ({label})", cases(description)

    reports = []
    try:
        run_source = source_runner(description)
    except SourceUnavailable as error:
        if require_source:
            raise ConversionError(str(error)) from None
        log(f"Skipping the comparison with the source framework: {error}")
        run_source = None
    exact = None
    if run_source is not None:
        try:
            exact = source_runner(description, float64=True)
        except SourceUnavailable as error:
            log(f"No float64 run of the source ({error}): checks hold to --atol against its float32 run")
    if exact is not None:  # run once, shared by both reports
        exact = _cached(exact)
    if run_source is not None:
        reports.append(compare(config, run_source, _source_name(description), target, target_name, case_list, exact=exact, **common))
    if path.suffix == ".onnx" and description.source.get("framework") != "ncps_mlx":
        reports.append(compare(config, mlx_runner(model), "ncps_mlx (converted)", target, target_name, case_list, exact=exact, **common))
    return reports

"""Running the Keras source of a conversion, for verification: in a subprocess with the
environment its flavour needs (tf.keras: ``TF_USE_LEGACY_KERAS=1``; Keras 3), ``load_model``
where the reference can reload the file, else the model rebuilt with today's reference classes
(ncps.tf or ncps.keras) and the file's weights loaded into it. Files of ncps 0.0.x and keras-ncp
2.x are rebuilt with ncps.tf, whose cells compute the same function on the same weights (checked
by tools/make_keras_published_fixtures.py, which records the difference in each fixture).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..description import ConversionError, Description, reference_wiring

NCPS_LAYERS = ("CfC", "LTC")


def run_source(description: Description, float64: bool = False):
    """Runs the file in Keras (Keras 3 or tf.keras, in a subprocess with the environment that
    flavour needs): ``load_model`` when the reference can reload the file, else the model
    rebuilt with the reference classes and the file's weights loaded into it. ``float64``: the
    model rebuilt under a float64 dtype policy (``SourceUnavailable`` where a class keeps float32)."""
    return lambda inputs: run_sources([(description, inputs)], float64=float64)[0]


def run_sources(pairs, float64: bool = False):
    """Several ``(description, inputs)`` of one flavour in one subprocess, so that TensorFlow
    and Keras start once (~5 s each time): per pair, the results of ``run_source``."""
    from ..verify import SourceUnavailable, graph_results

    flavours = {description.source["framework"] for description, _ in pairs}
    if len(flavours) != 1:
        raise ValueError(f"run_sources takes sources of one flavour, got {sorted(flavours)}")
    legacy = flavours == {"tf.keras"}
    with tempfile.TemporaryDirectory() as folder:
        jobs = []
        for n, (description, inputs) in enumerate(pairs):
            source = description.source
            job = {
                "path": source["file"],
                "legacy": legacy,
                "full_model": source.get("full_model", True),
                "layers": source["keras_layers"],
                "chain": source.get("keras_chain", True),
                "graph": {k: description.config[k] for k in ("inputs", "calls", "outputs")},
                "input_shape": description.config["inputs"][0]["shape"],
                "input_size": np.asarray(inputs[0][0][0]).shape[-1],
                "cases": len(inputs),
                "inputs_per_case": len(inputs[0][0]),
                "float64": float64,
                "inputs": os.path.join(folder, f"inputs_{n}.npz"),
                "outputs": os.path.join(folder, f"outputs_{n}.npz"),
            }
            np.savez(job["inputs"], **{f"{i}_{k}": np.asarray(x) for i, (xs, _, _) in enumerate(inputs) for k, x in enumerate(xs)})
            jobs.append(job)
        job_path = os.path.join(folder, "jobs.json")
        with open(job_path, "w") as handle:
            json.dump({"jobs": jobs}, handle, default=int)
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
        if legacy:
            env["TF_USE_LEGACY_KERAS"] = "1"
        else:
            env.pop("TF_USE_LEGACY_KERAS", None)
        code = "from ncps_mlx.converters.keras.reference import worker_main; worker_main()"
        done = subprocess.run([sys.executable, "-c", code, job_path], env=env, capture_output=True, text=True)
        if done.returncode == 3:
            raise SourceUnavailable(done.stderr.strip().splitlines()[-1])
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["(no output)"]
            raise ConversionError(f"running the Keras source failed: {lines[-1]}")
        answers = []
        for (description, inputs), job in zip(pairs, jobs):
            names = [o["name"] for o in description.config["outputs"]]
            results = np.load(job["outputs"])
            count = lambda i: int(results[f"{i}_n"])  # noqa: E731
            answers.append([graph_results(names, [results[f"{i}_{j}"] for j in range(count(i))]) for i in range(len(inputs))])
        return answers


def worker_main():
    """Subprocess side of ``run_sources``: per job, loads or rebuilds the Keras model and runs
    its inputs."""
    with open(sys.argv[1]) as handle:
        jobs = json.load(handle)["jobs"]
    legacy = jobs[0]["legacy"]
    try:
        if legacy:
            import tensorflow as tf
            import ncps.tf as flavour

            keras = tf.keras
        else:
            import keras
            import ncps.keras as flavour
    except ImportError as error:
        print(f"verifying a {'tf.keras' if legacy else 'Keras 3'} file needs TensorFlow and ncps "
              f"(pip install 'ncps-mlx[tf]'): {error}", file=sys.stderr)
        sys.exit(3)
    if jobs[0].get("float64"):
        keras.backend.set_floatx("float64")
        (keras.config.set_dtype_policy if hasattr(keras, "config") and hasattr(keras.config, "set_dtype_policy")
         else keras.mixed_precision.set_global_policy)("float64")
    for job in jobs:
        if not job.get("float64"):
            _run_job(job, keras, flavour)
            continue
        try:
            _run_job(job, keras, flavour)
        except Exception as error:  # a reference class that keeps float32 weights (ncps.tf's LTC)
            print(f"the Keras reference does not run in float64 ({type(error).__name__}: {str(error).splitlines()[0][:200]})", file=sys.stderr)
            sys.exit(3)


def _run_job(job, keras, flavour):
    custom = {name: getattr(flavour, name) for name in ("CfC", "LTC", "CfCCell", "LTCCell", "WiredCfCCell", "MixedMemoryRNN")}
    model = None
    if job.get("float64"):
        job = {**job, "layers": [_without_dtypes(layer) for layer in job["layers"]]}
    elif job["full_model"]:
        try:
            model = keras.models.load_model(job["path"], custom_objects=custom, compile=False)
        except Exception:  # the reference cannot reload every file it writes (reference-notes point 9)
            model = None
    if model is None:
        model = _rebuild(job, keras, flavour)
        path = Path(job["path"])
        if path.is_dir():
            model.load_weights(str(path / "variables" / "variables"))
        elif job["legacy"] and not job.get("chain", True):  # a rebuilt graph's layers, found by name
            model.load_weights(str(path), by_name=True)
        else:
            model.load_weights(str(path))
    data = np.load(job["inputs"])
    results = {}
    for i in range(job["cases"]):
        xs = [data[f"{i}_{k}"] for k in range(job["inputs_per_case"])]
        if job.get("float64"):
            xs = [x.astype(np.float64) if x.dtype.kind == "f" else x for x in xs]
        out = model(xs if len(xs) > 1 else xs[0])
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        if job.get("float64") and any(np.asarray(v).dtype != np.float64 for v in outs):
            raise TypeError("the model computes in float32 under a float64 policy")
        results[f"{i}_n"] = np.array(len(outs))
        for j, value in enumerate(outs):
            results[f"{i}_{j}"] = np.asarray(value)
    np.savez(job["outputs"], **results)


def _without_dtypes(value):
    """A layer config with its dtype (policy) entries removed, so the global policy applies."""
    if isinstance(value, dict):
        return {k: _without_dtypes(v) for k, v in value.items() if k != "dtype"}
    if isinstance(value, list):
        return [_without_dtypes(v) for v in value]
    return value


def _rebuild(job, keras, flavour):
    """The model from its layer configs, with the reference's own layer classes: a Sequential
    for a chain (so a SavedModel's variables load in its order), else the functional graph."""
    if job.get("chain", True):
        shape = job.get("input_shape") or [None, job["input_size"]]
        return keras.Sequential([keras.Input(tuple(shape))] + [_reference_layer(layer, keras, flavour) for layer in job["layers"]])
    graph = job["graph"]
    floats = "float64" if job.get("float64") else "float32"
    dtype = lambda spec: floats if (spec.get("dtype") or "float32").startswith(("float", "bfloat")) else spec["dtype"]  # noqa: E731
    inputs = [keras.Input(tuple(spec["shape"]), dtype=dtype(spec), name=spec["name"]) for spec in graph["inputs"]]
    values = {("input", k): tensor for k, tensor in enumerate(inputs)}
    built = {}
    for c, call in enumerate(graph["calls"]):
        index = call["layer"]
        if index not in built:
            built[index] = _reference_layer(job["layers"][index], keras, flavour, named=True)
        args = [values[tuple(ref)] for ref in call["inputs"]]
        out = built[index](args if len(args) > 1 else args[0])
        for j, value in enumerate(out if isinstance(out, (list, tuple)) else [out]):
            values[(c, j)] = value
    outputs = [values[tuple(o["ref"])] for o in graph["outputs"]]
    return keras.Model(inputs, outputs if len(outputs) > 1 else outputs[0])


def _reference_layer(layer, keras, flavour, named=False):
    kind, cfg = layer["class_name"], dict(layer["config"])
    if kind in NCPS_LAYERS:
        units = cfg.pop("units")
        if isinstance(units, dict):
            units = reference_wiring(units)
        cfg.pop("wiring", None)
        cfg.pop("name", None)
        if kind == "LTC":
            for key in ("mode", "activation", "backbone_units", "backbone_layers", "backbone_dropout"):
                cfg.pop(key, None)
        elif isinstance(units, int) is False:
            for key in ("backbone_units", "backbone_layers", "backbone_dropout"):
                cfg.pop(key, None)
        if named and layer.get("name"):
            cfg["name"] = layer["name"]
        return getattr(flavour, kind)(units, **{k: v for k, v in cfg.items() if k != "class"})
    if kind == "TimeDistributed":
        return keras.layers.TimeDistributed(keras.layers.deserialize(cfg["layer"]), **({"name": cfg["name"]} if named else {}))
    if kind == "Bidirectional":
        custom = {name: getattr(flavour, name) for name in ("CfC", "LTC", "CfCCell", "LTCCell", "WiredCfCCell", "MixedMemoryRNN")}
        return keras.layers.deserialize({"class_name": kind, "config": cfg}, custom_objects=custom)
    return getattr(keras.layers, kind).from_config(cfg)


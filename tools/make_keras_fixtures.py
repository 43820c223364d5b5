"""Regenerate fixtures/keras (Keras 3) or fixtures/tf_keras (tf.keras) with the reference package.

    python tools/make_keras_fixtures.py keras      # Keras 3, ncps.keras
    TF_USE_LEGACY_KERAS=1 python tools/make_keras_fixtures.py tf    # tf.keras 2, ncps.tf

(``tools/make_fixtures.py`` runs both, each in its own process with its own environment.)
For each variant: NAME.keras (Keras 3) or NAME.h5 (tf.keras full model; a weights-only .h5 where
tf.keras cannot save the model; a SavedModel folder NAME/ for the *_savedmodel ones), NAME.json when ``ncps-convert`` needs a --config, and NAME.npz
with the input ``x`` and the outputs of the live model object (``out_0``, ``out_1``, ...), so
the expected numbers never depend on the reference reloading its own file.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

FLAVOUR = sys.argv[1] if len(sys.argv) > 1 else "keras"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["KERAS_BACKEND"] = "tensorflow"
if FLAVOUR == "tf":
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import tensorflow as tf
    import ncps.tf as ncps_flavour

    keras = tf.keras
else:
    import keras
    import ncps.keras as ncps_flavour
import ncps.wirings as nw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixture_weights import perturb  # noqa: E402,F401  (make_keras_graph_fixtures imports it from here)

CfC, LTC = ncps_flavour.CfC, ncps_flavour.LTC
layers = keras.layers
I, T = 4, 12


def seq(*body, steps=None):
    return keras.Sequential([keras.Input((steps, I))] + list(body))


def return_state_model():
    inputs = keras.Input((None, I))
    out, state = CfC(6, return_sequences=True, return_state=True, backbone_units=8)(inputs)
    return keras.Model(inputs, [out, state])


def normalized():
    norm = layers.Normalization()
    norm.adapt(np.random.default_rng(7).normal(1.0, 2.0, size=(64, T, I)).astype(np.float32))
    return seq(
        norm,
        CfC(8, activation="silu", backbone_layers=2, backbone_units=12, return_sequences=True),
        layers.TimeDistributed(layers.Dense(3)),
        layers.Activation("tanh"),
    )


NCP_ARGS = dict(inter_neurons=4, command_neurons=3, motor_neurons=2, sensory_fanout=2, inter_fanout=2,
                recurrent_command_synapses=2, motor_fanin=2, seed=3)

# name: (builder, --config or None, formats) ; formats: "full" (model file) or "weights" (+ config)
VARIANTS = {
    "cfc_seq_dense": (lambda: seq(CfC(8, return_sequences=True, backbone_units=16), layers.Dense(2)), None),
    "cfc_pure_last": (lambda: seq(CfC(8, mode="pure", backbone_units=16)), None),
    "cfc_no_gate_mixed": (lambda: seq(CfC(8, mode="no_gate", mixed_memory=True, backbone_units=16, return_sequences=True)), None),
    "cfc_norm_backbone2_timedistributed": (normalized, None),
    "cfc_go_backwards": (lambda: seq(CfC(6, go_backwards=True, return_sequences=True, backbone_units=8)), None),
    "cfc_flatten_dense": (lambda: seq(CfC(4, return_sequences=True, backbone_units=8), layers.Flatten(), layers.Dropout(0.2), layers.Dense(2), steps=T), None),
    "ltc_fc_seq": (lambda: seq(LTC(6, return_sequences=True)), None),
    "ltc_mixed_dense": (lambda: seq(LTC(6, mixed_memory=True), layers.Dense(2, activation="relu")), None),
    "ltc_autoncp_dense": (lambda: seq(LTC(nw.AutoNCP(10, 3), return_sequences=False), layers.Dense(1)), None),
}
if FLAVOUR == "keras":
    VARIANTS.update({
        "cfc_return_state": (return_state_model, None),
        "cfc_autoncp": (lambda: seq(CfC(nw.AutoNCP(10, 3), return_sequences=True)), None),
        "cfc_autoncp_mixed_dense": (lambda: seq(CfC(nw.AutoNCP(12, 4), mixed_memory=True), layers.Dense(2)), None),
        "cfc_autoncp_pure": (lambda: seq(CfC(nw.AutoNCP(10, 3, seed=4), mode="pure", return_sequences=True)), None),
        "cfc_autoncp_no_gate_last": (lambda: seq(CfC(nw.AutoNCP(10, 3, seed=6), mode="no_gate")), None),
        # Weights only (model.save_weights): the model comes from --config, here model.to_json().
        "ltc_fc_weights_only": (lambda: seq(LTC(5, return_sequences=True), layers.Dense(2)), "to_json"),
        # An NCP's config loses its seed and Keras keeps no masks: the wiring comes from --config.
        "ltc_ncp_mixed": (lambda: seq(LTC(nw.NCP(**NCP_ARGS), mixed_memory=True, return_sequences=True, name="ltc_ncp")), {"wirings": {"ltc_ncp": {"class": "NCP", **NCP_ARGS}}}),
    })
else:
    # tf.keras cannot save a wired CfC as a model (WiredCfCCell.get_config fails, reference-notes
    # point 9): its weights-only .h5 converts with the model described in --config.
    wired_config = {"class_name": "Sequential", "config": {"layers": [
        {"class_name": "CfC", "config": {"units": {"class": "AutoNCP", "units": 10, "output_size": 3}, "return_sequences": True}},
    ]}}
    wired_pure_config = json.loads(json.dumps(wired_config).replace('"return_sequences": true', '"return_sequences": false, "mode": "pure"'))
    wired_no_gate_config = json.loads(json.dumps(wired_config).replace('"return_sequences": true', '"return_sequences": true, "mode": "no_gate"'))
    VARIANTS.update({
        "cfc_autoncp_weights_only": (lambda: seq(CfC(nw.AutoNCP(10, 3), return_sequences=True)), wired_config),
        "cfc_autoncp_pure_weights_only": (lambda: seq(CfC(nw.AutoNCP(10, 3), mode="pure")), wired_pure_config),
        "cfc_autoncp_no_gate_weights_only": (lambda: seq(CfC(nw.AutoNCP(10, 3), mode="no_gate", return_sequences=True)), wired_no_gate_config),
        "ltc_ncp_seq": (lambda: seq(LTC(nw.NCP(**NCP_ARGS), return_sequences=True, name="ltc_ncp")), {"wirings": {"ltc_ncp": {"class": "NCP", **NCP_ARGS}}}),
        # TensorFlow SavedModel directories (model.save(folder, save_format="tf")).
        "cfc_mixed_dense_savedmodel": (lambda: seq(CfC(8, mixed_memory=True, backbone_units=16, return_sequences=True), layers.Dense(2)), "savedmodel"),
        "ltc_autoncp_savedmodel": (lambda: seq(LTC(nw.AutoNCP(10, 3))), "savedmodel"),
    })


def main():
    out = Path(__file__).resolve().parents[1] / "fixtures" / ("keras" if FLAVOUR == "keras" else "tf_keras")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for index, (name, (build, config)) in enumerate(VARIANTS.items()):
        keras.utils.set_random_seed(index)
        model = build()
        # Keras CfCs have no head tanh: the no_gate and wired ones grow fast enough (to ~100 in 32
        # steps) that float32 spacing alone exceeds 1e-5; half-size weights keep them bounded.
        perturb(model, index, scale=0.5 if "no_gate" in name or "cfc_autoncp" in name else 1.0)
        x = np.random.default_rng(100 + index).normal(size=(2, T, I)).astype(np.float32)
        outputs = model(x)
        outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        np.savez(out / f"{name}.npz", x=x, **{f"out_{i}": np.asarray(o) for i, o in enumerate(outputs)})
        if config == "savedmodel":
            config = None
            model.save(out / name, save_format="tf")
        elif config == "to_json":
            config = json.loads(model.to_json())
            model.save_weights(out / f"{name}.weights.h5")
        elif FLAVOUR == "keras":
            model.save(out / f"{name}.keras")
        elif config is None or "wirings" in config:
            model.save(out / f"{name}.h5")
        else:
            model.save_weights(out / f"{name}.h5")
        if config is not None:
            (out / f"{name}.json").write_text(json.dumps(config, indent=2) + "\n")
        print(f"wrote {out.name}/{name}")


if __name__ == "__main__":
    main()

"""Regenerate fixtures/keras_published: files laid out as the Keras NCP checkpoints people have
published, each written by the framework and package version that writes that layout.

    python tools/make_keras_published_fixtures.py            # every flavour, each in its own process

The old packages never enter the project's dependencies: they are installed beside it, with
``pip install --no-deps --target``, into ``build/fixture-packages/`` (what each flavour does
first, from the package registry), and put first on ``sys.path`` in that flavour's process only:

* ``ncps007``: tf.keras (tf_keras, ``TF_USE_LEGACY_KERAS=1``) with ncps 0.0.7, whose wirings'
  ``get_config`` returns numpy matrices: tf.keras writes them as ``__numpy__`` objects, in a
  ``.keras`` archive and in a ``.h5`` file (the reference cannot reload either).
* ``kerasncp``: tf.keras with keras-ncp 2.0.5, the documented ``keras.layers.RNN(LTCCell(NCP))``
  and ``RNN(WiredCfcCell(NCP))``, saved with ``save_weights`` as ``.h5``. The LTC's --config is
  ``model.to_json()`` of the same model built in an earlier session (its layers numbered
  ``rnn``/``dense``, the file's ``rnn_1``/``dense_1``); keras-ncp 2.0.5's ``WiredCfcCell.get_config``
  raises, so the wired CfC's --config is written by hand as the equivalent ncps ``CfC``. Each
  file is also loaded into today's ncps.tf classes: ``reference_max_abs`` in its .npz is how far
  ncps.tf's outputs are from keras-ncp's on the same weights (the verification runs ncps.tf).
* ``tf``: tf.keras with ncps.tf 1.0.1: a CNN trunk (``Rescaling``, ``TimeDistributed`` of an
  adapted ``Normalization``, of ``GaussianNoise`` and of ``Conv2D``s) before a CfC, as ``.h5``.
* ``keras``: Keras 3 with ncps.keras: three stacked LTCs with two heads saved in the legacy
  ``.h5`` format (``model.save("x.h5")``); a ``Normalization`` given as constants and a
  ``Conv1D(activation=LeakyReLU(0.4))`` before a mixed-memory wired CfC, as ``.weights.h5`` with
  ``model.to_json()`` as --config; a CfC trained under the ``mixed_float16`` policy as
  ``.keras`` (its .npz: ``out_0`` from the same weights in float32, ``mixed_out_0`` as Keras
  computes it in float16).

Each NAME.npz holds the inputs ``x_0`` and the live model's outputs ``out_0``, ... (so the
expected numbers never depend on Keras reloading a file), NAME.json the --config where needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "fixtures" / "keras_published"
SITES = ROOT / "build" / "fixture-packages"
PACKAGES = {"ncps007": "ncps==0.0.7", "kerasncp": "keras-ncp==2.0.5"}
T = 10
NCP_ARGS = (4, 3, 2, 2, 2, 2, 2)  # inter, command, motor, sensory fan-out, inter fan-out, recurrent command, motor fan-in


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for flavour in ("ncps007", "kerasncp", "tf", "keras"):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
        env.pop("TF_USE_LEGACY_KERAS", None)
        if flavour != "keras":
            env["TF_USE_LEGACY_KERAS"] = "1"
        if flavour in PACKAGES:
            site = SITES / flavour
            if not site.exists():
                subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
                                PACKAGES[flavour]], check=True)
        subprocess.run([sys.executable, __file__, flavour], env=env, check=True)


def save(name, model, x, config=None, **extra):
    outputs = model(x)
    outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
    np.savez(OUT / f"{name}.npz", x_0=x, **{f"out_{i}": np.asarray(o) for i, o in enumerate(outputs)}, **extra)
    if config is not None:
        (OUT / f"{name}.json").write_text(json.dumps(config, indent=1) + "\n")
    print(f"wrote keras_published/{name}")


def inputs(seed, *shape):
    return np.random.default_rng(seed).normal(size=(2, T, *shape)).astype(np.float32)


def ncps007(keras, perturb):
    from ncps import wirings
    from ncps.tf import LTC

    def model():
        sensors = keras.Input((None, 4), name="sensors")
        seq = LTC(wirings.NCP(*NCP_ARGS, seed=3), return_sequences=True, name="ltc")(sensors)
        steer = keras.layers.Dense(2, name="steer")(seq)
        brake = keras.layers.Dense(1, activation="sigmoid", name="brake")(seq)
        return keras.Model(sensors, [steer, brake])

    for index, suffix in enumerate((".keras", ".h5")):
        keras.utils.set_random_seed(index)
        m = model()
        perturb(m, index)
        name = f"ncps007_ltc_ncp_two_heads_{suffix[1:]}"
        m.save(OUT / f"{name}{suffix}")
        save(name, m, inputs(index, 4))


def kerasncp(keras, perturb):
    import ncps.tf
    import ncps.wirings
    from kerasncp import wirings
    from kerasncp.tf import LTCCell, WiredCfcCell

    def ltc_model():
        return keras.Sequential([keras.Input((None, 4)), keras.layers.RNN(LTCCell(wirings.NCP(*NCP_ARGS, seed=3)), return_sequences=True),
                                 keras.layers.Dense(2)])

    keras.utils.set_random_seed(10)
    published_json = json.loads(ltc_model().to_json())  # layers rnn, dense; the weights' model: rnn_1, dense_1
    m = ltc_model()
    perturb(m, 10)
    x = inputs(10, 4)
    m.save_weights(OUT / "kerasncp_rnn_ltc_ncp.h5")
    twin = keras.Sequential([keras.Input((None, 4)), ncps.tf.LTC(ncps.wirings.NCP(*NCP_ARGS, seed=3), return_sequences=True), keras.layers.Dense(2)])
    twin.load_weights(OUT / "kerasncp_rnn_ltc_ncp.h5")
    gap = np.max(np.abs(np.asarray(twin(x)) - np.asarray(m(x))))
    save("kerasncp_rnn_ltc_ncp", m, x, published_json, reference_max_abs=gap)

    keras.utils.set_random_seed(11)
    m = keras.Sequential([keras.Input((None, 4)), keras.layers.RNN(WiredCfcCell(wirings.NCP(*NCP_ARGS, seed=5), mode="default"), return_sequences=True)])
    perturb(m, 11, scale=0.5)
    x = inputs(11, 4)
    m.save_weights(OUT / "kerasncp_rnn_wired_cfc_ncp.h5")
    twin = keras.Sequential([keras.Input((None, 4)), ncps.tf.CfC(ncps.wirings.NCP(*NCP_ARGS, seed=5), return_sequences=True)])
    twin.load_weights(OUT / "kerasncp_rnn_wired_cfc_ncp.h5")
    gap = np.max(np.abs(np.asarray(twin(x)) - np.asarray(m(x))))
    inter, command, motor, sensory_fanout, inter_fanout, recurrent, motor_fanin = NCP_ARGS
    wiring = {"class": "NCP", "inter_neurons": inter, "command_neurons": command, "motor_neurons": motor,
              "sensory_fanout": sensory_fanout, "inter_fanout": inter_fanout, "recurrent_command_synapses": recurrent,
              "motor_fanin": motor_fanin, "seed": 5}
    hand_written = {"class_name": "Sequential", "config": {"layers": [
        {"class_name": "CfC", "config": {"name": "rnn", "units": wiring, "mode": "default", "return_sequences": True}}]}}
    save("kerasncp_rnn_wired_cfc_ncp", m, x, hand_written, reference_max_abs=gap)


def tf(keras, perturb):
    from ncps.tf import CfC

    layers = keras.layers
    keras.utils.set_random_seed(20)
    frames = inputs(20, 8, 8, 3) * 60 + 128
    norm = layers.Normalization()
    norm.adapt((frames[:, :4].reshape(-1, 8, 8, 3) / 127.5 - 1.0).astype(np.float32))
    m = keras.Sequential([
        keras.Input((None, 8, 8, 3)),
        layers.Rescaling(1 / 127.5, offset=-1.0),
        layers.TimeDistributed(norm),
        layers.TimeDistributed(layers.GaussianNoise(0.2)),
        layers.TimeDistributed(layers.Conv2D(4, 3, strides=2, padding="same", activation="relu")),
        layers.TimeDistributed(layers.Conv2D(6, 3, activation="elu")),
        layers.TimeDistributed(layers.GlobalAveragePooling2D()),
        CfC(8, backbone_units=16, return_sequences=True),
        layers.Dense(2),
    ])
    perturb(m, 20)
    m.save(OUT / "tf_cnn_trunk_cfc.h5")
    save("tf_cnn_trunk_cfc", m, frames)


def keras3(keras, perturb):
    import ncps.keras as nk
    import ncps.wirings as nw

    layers = keras.layers
    keras.utils.set_random_seed(30)
    sensors = keras.Input((None, 4), name="sensors")
    seq = nk.LTC(6, return_sequences=True)(sensors)
    seq = nk.LTC(nw.AutoNCP(8, 5, seed=2), return_sequences=True)(seq)
    last = nk.LTC(5, mixed_memory=True)(seq)
    m = keras.Model(sensors, [layers.Dense(2, name="steer")(last), layers.Dense(1, activation="sigmoid", name="speed")(last),
                              layers.TimeDistributed(layers.Dense(3), name="per_step")(seq)])
    perturb(m, 30)
    m.save(OUT / "keras3_three_ltcs_heads.h5")
    save("keras3_three_ltcs_heads", m, inputs(30, 4))

    keras.utils.set_random_seed(31)
    m = keras.Sequential([
        keras.Input((None, 4)),
        layers.Normalization(mean=[0.5, -1.0, 2.0, 0.0], variance=[1.0, 4.0, 0.25, 2.0]),
        layers.Conv1D(6, 3, padding="causal", activation=layers.LeakyReLU(0.4)),
        nk.CfC(nw.AutoNCP(10, 3, seed=4), mixed_memory=True, return_sequences=True),
        layers.Dense(2),
    ])
    perturb(m, 31, scale=0.5)
    m.save_weights(OUT / "keras3_conv1d_leaky_mixed_wired_cfc.weights.h5")
    save("keras3_conv1d_leaky_mixed_wired_cfc", m, inputs(31, 4), json.loads(m.to_json()))

    def cfc_head():
        return keras.Sequential([keras.Input((None, 4)), nk.CfC(16, backbone_units=32, return_sequences=True), layers.Dense(2)])

    keras.utils.set_random_seed(32)
    keras.config.set_dtype_policy("mixed_float16")  # trained under mixed precision: float16 compute
    mixed = cfc_head()
    keras.config.set_dtype_policy("float32")
    perturb(mixed, 32)
    mixed.save(OUT / "keras3_mixed_float16_cfc.keras")
    twin = cfc_head()  # the same weights computed in float32: what the conversion computes
    twin.set_weights(mixed.get_weights())
    x = inputs(32, 4)
    save("keras3_mixed_float16_cfc", twin, x, mixed_out_0=np.asarray(mixed(x), np.float32))


if __name__ == "__main__":
    if len(sys.argv) == 1:
        main()
        sys.exit()
    flavour = sys.argv[1]
    if flavour in PACKAGES:
        sys.path.insert(0, str(SITES / flavour))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fixture_weights import perturb

    if flavour == "keras":
        import keras

        keras3(keras, perturb)
    else:
        import tensorflow

        {"ncps007": ncps007, "kerasncp": kerasncp, "tf": tf}[flavour](tensorflow.keras, perturb)

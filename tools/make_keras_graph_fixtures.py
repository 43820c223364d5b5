"""Regenerate fixtures/keras_graphs: whole Keras models as people build them around an NCP.

    python tools/make_keras_graph_fixtures.py keras    # Keras 3 + ncps.keras -> NAME.keras
    python tools/make_keras_graph_fixtures.py tf       # tf.keras 2 + ncps.tf -> tf_NAME.h5

(``tools/make_fixtures.py`` runs both, each in its own process with its own environment.)
Each model gets non-trivial weights; NAME.npz holds the inputs ``x_0``, ``x_1``, ... (in the
model's input order, of its declared shapes) and the live model's outputs ``out_0``, ... (in
its output order), so the expected numbers never depend on Keras reloading its own file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

# The flavour (Keras 3 or tf.keras, from argv[1]) is set up once, by the fixture script this
# one shares its environment, imports and weight perturbation with.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_keras_fixtures import FLAVOUR, CfC, LTC, keras, layers, nw, perturb  # noqa: E402


def two_inputs_two_heads():
    """A sequence branch and a static branch, merged, two named heads."""
    sensors = keras.Input((None, 4), name="sensors")
    context = keras.Input((6,), name="context")
    seq = layers.LayerNormalization(name="seq_norm")(sensors)
    seq = CfC(8, backbone_units=16, name="cfc")(seq)
    static = layers.Dense(8, activation="relu", name="static_dense")(context)
    static = layers.BatchNormalization(name="static_bn")(static)
    joined = layers.Concatenate(name="join")([seq, static])
    added = layers.Add(name="residual")([seq, static])
    trunk = layers.Dense(16, activation="tanh", name="trunk")(joined)
    trunk = layers.Dropout(0.3, name="drop")(trunk)
    steer = layers.Dense(2, name="steer")(trunk)
    speed = layers.Dense(1, activation="sigmoid", name="speed")(layers.Multiply(name="gate")([trunk, layers.Dense(16)(added)]))
    return keras.Model([sensors, context], [steer, speed])


def timedistributed_conv_cfc():
    """Frames (T, 16, 16, 3): a TimeDistributed conv encoder, then a CfC, then a head."""
    frames = keras.Input((None, 16, 16, 3), name="frames")
    x = layers.TimeDistributed(layers.Conv2D(4, 3, strides=2, padding="same", activation="relu"))(frames)
    x = layers.TimeDistributed(layers.MaxPooling2D(2))(x)
    x = layers.TimeDistributed(layers.Conv2D(6, 2, padding="valid"))(x)
    x = layers.TimeDistributed(layers.GlobalAveragePooling2D())(x)
    x = layers.TimeDistributed(layers.Dense(8, activation="elu"))(x)
    x = CfC(6, backbone_units=8, return_sequences=True)(x)
    return keras.Model(frames, layers.TimeDistributed(layers.Dense(2))(x))


def bidirectional():
    inputs = keras.Input((None, 4), name="series")
    x = layers.Bidirectional(CfC(6, backbone_units=8, return_sequences=True), merge_mode="concat")(inputs)
    x = layers.Bidirectional(LTC(5, return_sequences=True), merge_mode="ave")(x)
    x = layers.Bidirectional(CfC(nw.AutoNCP(8, 3), return_sequences=False), merge_mode="sum")(x)
    return keras.Model(inputs, layers.Dense(2)(x))


def fixed_length():
    """An Input of fixed length 12: a causal Conv1D, a CfC over the 12 steps, pooling, Flatten."""
    inputs = keras.Input((12, 4), name="window")
    x = layers.Conv1D(6, 3, padding="causal", activation="relu")(inputs)
    x = CfC(8, backbone_units=8, return_sequences=True)(x)
    x = layers.AveragePooling1D(2)(x)
    x = layers.Flatten()(x)
    return keras.Model(inputs, layers.Dense(3)(x))


def encoder_decoder():
    """Token ids -> Embedding -> LTC encoder -> RepeatVector -> CfC decoder -> per-step Dense."""
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    x = layers.Embedding(20, 5)(tokens)
    code = LTC(6, mixed_memory=True)(x)
    x = layers.RepeatVector(4)(code)
    x = CfC(6, backbone_units=8, return_sequences=True, mixed_memory=True)(x)
    x = layers.Permute((2, 1))(x)
    x = layers.Reshape((4, 6))(layers.Permute((2, 1))(x))
    return keras.Model(tokens, layers.TimeDistributed(layers.Dense(3, activation="softmax"))(x))


def masked_padding():
    """Padded sequences: Masking, then RNNs that skip the padded steps (one zeroing its output there)."""
    series = keras.Input((None, 4), name="series")
    masked = layers.Masking(0.0)(series)
    x = layers.Bidirectional(CfC(6, backbone_units=8, return_sequences=True), merge_mode="concat")(masked)
    x = layers.LayerNormalization()(x)
    per_step = CfC(5, backbone_units=8, return_sequences=True, zero_output_for_mask=True)(x)
    last = LTC(5)(x)
    return keras.Model(series, [layers.TimeDistributed(layers.Dense(2))(per_step), layers.Dense(1)(last)])


def embedding_mask_zero():
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    x = layers.Embedding(20, 5, mask_zero=True)(tokens)
    # (ncps.keras's mixed-memory CfC fails under a mask in Keras itself: a reference bug.)
    x = CfC(6, backbone_units=8)(x)
    return keras.Model(tokens, layers.Dense(3)(x))


VARIANTS = {
    "two_inputs_two_heads": two_inputs_two_heads,
    "masked_padding": masked_padding,
    "embedding_mask_zero": embedding_mask_zero,
    "timedistributed_conv_cfc": timedistributed_conv_cfc,
    "bidirectional": bidirectional,
    "fixed_length": fixed_length,
    "encoder_decoder": encoder_decoder,
}
if FLAVOUR == "tf":  # tf.keras: the patterns its users save as .h5
    VARIANTS = {f"tf_{name}": VARIANTS[name] for name in ("two_inputs_two_heads", "fixed_length")}


def inputs_for(model, rng, steps=9, batch=3, padded=False):
    """One array per input; ``padded``: sample b's last b steps (and step 1 of odd samples) are
    padding (zeros: Masking's value, Embedding's id 0)."""
    xs = []
    for tensor in model.inputs:
        shape = [batch] + [steps if d is None else int(d) for d in tuple(tensor.shape)[1:]]
        if "int" in str(tensor.dtype):
            x = rng.integers(1, 20, size=shape).astype(np.int32)
        else:
            x = rng.normal(size=shape).astype(np.float32)
        if padded:
            for b in range(1, batch):
                x[b, steps - b :] = 0
                if b % 2:
                    x[b, 1] = 0
        xs.append(x)
    return xs


def main():
    out = Path(__file__).resolve().parents[1] / "fixtures" / "keras_graphs"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("tf_*" if FLAVOUR == "tf" else "[!t]*"):
        old.unlink()
    for index, (name, build) in enumerate(VARIANTS.items()):
        keras.utils.set_random_seed(50 + index)
        model = build()
        perturb(model, 50 + index)
        rng = np.random.default_rng(200 + index)
        if any(isinstance(layer, layers.BatchNormalization) for layer in model.layers):
            for layer in model.layers:  # moving statistics away from (0, 1)
                if isinstance(layer, layers.BatchNormalization):
                    mean, variance = layer.moving_mean, layer.moving_variance
                    mean.assign(rng.normal(size=mean.shape).astype(np.float32))
                    variance.assign(rng.uniform(0.5, 2.0, size=variance.shape).astype(np.float32))
        xs = inputs_for(model, rng, padded="mask" in name)
        outputs = model(xs if len(xs) > 1 else xs[0], training=False)
        outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        np.savez(
            out / f"{name}.npz",
            **{f"x_{i}": x for i, x in enumerate(xs)},
            **{f"out_{i}": np.asarray(o) for i, o in enumerate(outputs)},
        )
        model.save(out / f"{name}.{'h5' if FLAVOUR == 'tf' else 'keras'}")
        print(f"wrote keras_graphs/{name}")


if __name__ == "__main__":
    main()

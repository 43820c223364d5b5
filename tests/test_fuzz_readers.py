"""Property-based fuzzing of every reader: truncations at random offsets and random byte flips
of every fixture format. The only exceptions allowed out of ``readers.read`` (and building
what it read) are the project's own: ``ConversionError`` and ``ModelFileError``.

The default run is a fixed budget (``EXAMPLES`` per format, derandomized, so a run is
repeatable and short); set ``NCPS_MLX_FUZZ_EXAMPLES`` for a longer hunt.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import ncps_mlx  # noqa: E402
from ncps_mlx.converters import readers  # noqa: E402
from ncps_mlx.converters.description import ConversionError  # noqa: E402
from ncps_mlx.converters.modelfile import ModelFileError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1] / "fixtures"
EXAMPLES = int(os.environ.get("NCPS_MLX_FUZZ_EXAMPLES", "40"))


def _model_file() -> Path:
    path = Path(tempfile.gettempdir()) / "ncps_mlx_fuzz_model.safetensors"
    if not path.exists():
        ncps_mlx.save(ncps_mlx.CfC(4, ncps_mlx.wirings.AutoNCP(8, 2)), path)
    return path


FORMATS = {
    "torch .pt": lambda: ROOT / "torch" / "cfc_default.pt",
    "torch .safetensors": lambda: ROOT / "torch" / "cfc_mixed.safetensors",
    "torch wrapper .pt": lambda: ROOT / "torch_wrappers" / "wrapper.pt",
    "lightning .ckpt": lambda: ROOT / "torch_wrappers" / "lightning.ckpt",
    "keras .keras": lambda: ROOT / "keras" / "cfc_seq_dense.keras",
    "keras graph .keras": lambda: ROOT / "keras_graphs" / "two_inputs_two_heads.keras",
    "tf.keras .h5": lambda: ROOT / "tf_keras" / "cfc_seq_dense.h5",
    "tf.keras .keras, ncps 0.0.x matrices": lambda: ROOT / "keras_published" / "ncps007_ltc_ncp_two_heads_keras.keras",
    "tf.keras .h5, ncps 0.0.x matrices": lambda: ROOT / "keras_published" / "ncps007_ltc_ncp_two_heads_h5.h5",
    "Keras 3 legacy .h5": lambda: ROOT / "keras_published" / "keras3_three_ltcs_heads.h5",
    "ncps-mlx model file": _model_file,
}
NEEDS_TORCH = ("torch .pt", "torch wrapper .pt", "lightning .ckpt")


def read_and_build(path):
    try:
        checkpoint = readers.read(path)
        for description in checkpoint.modules.values():
            description.build()
    except (ConversionError, ModelFileError):
        pass


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_readers_survive_damage(name, tmp_path):
    if name in NEEDS_TORCH:
        pytest.importorskip("torch")
    original = FORMATS[name]().read_bytes()
    target = tmp_path / f"damaged{FORMATS[name]().suffix}"

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(
        cut=st.one_of(st.none(), st.integers(0, len(original) - 1)),
        flips=st.lists(st.tuples(st.integers(0, len(original) - 1), st.integers(1, 255)), max_size=8),
    )
    def damaged(cut, flips):
        data = bytearray(original if cut is None else original[:cut])
        for position, mask in flips:
            if position < len(data):
                data[position] ^= mask
        target.write_bytes(bytes(data))
        read_and_build(target)

    damaged()

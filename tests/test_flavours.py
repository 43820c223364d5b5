"""The ncps.tf/keras flavour options (reference-notes points 0, 3, 4, 5), checked numerically.

Each oracle is ncps.torch rewired into the other flavour's circuit from its own parts, so the
comparison is against reference code, not against a re-statement of ours.
"""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx

import ncps_mlx

pytest.importorskip("torch")
from helpers import load_torch_weights, max_abs_diff, perturb_, to_mlx, torch
from test_parity_torch import INPUT, STEPS, TOL, build, make_inputs, run_pair, assert_parity

ncps_torch = pytest.importorskip("ncps.torch")


@pytest.mark.parametrize("units", [12, "autoncp"])
@pytest.mark.parametrize("mode", ["default", "no_gate", "pure"])
def test_cfc_without_head_tanh(units, mode):
    """ff_activation=None is ncps.torch's CfC with the tanh on ff1/ff2 removed (point 0)."""
    # Without the tanh, no_gate's state is unbounded (h <- ff1 + gate * ff2, both linear in h):
    # with full-size weights it grows ~1.2x a step, and past ~10 steps float32 spacing alone
    # (torch against torch-float64 included) exceeds 1e-5. Half-size weights keep it bounded.
    shrink = 0.5 if mode == "no_gate" else 1.0
    t_model, m_model = build("CfC", units, {"mode": mode}, {"ff_activation": None}, shrink=shrink)
    cells = [t_model.rnn_cell] if units == 12 else list(t_model.rnn_cell._layers)
    for cell in cells:
        cell.tanh = torch.nn.Identity()
    result = run_pair(t_model, m_model, make_inputs(batch=3))
    assert float(np.max(np.abs(result[0][0].numpy()))) < 10
    assert_parity(*result)
    if mode != "pure":
        # And it really is a different model from the default one.
        default = ncps_mlx.CfC(INPUT, m_model.wiring or 12, mode=mode)
        load_torch_weights(default, t_model)
        x = to_mlx(make_inputs(batch=3))
        assert max_abs_diff(default(x)[0], m_model(x)[0]) > 1e-2


def torch_input_circuit(t_lstm, t_cell, x, slice_to=None):
    """ncps.keras MixedMemoryRNN's circuit from ncps.torch parts: the LSTM output is the ODE
    cell's input and the ODE state is the LSTM's recurrent input."""
    batch = x.shape[0]
    h = torch.zeros(batch, t_lstm.hidden_size)
    c = torch.zeros(batch, t_lstm.hidden_size)
    outputs = []
    with torch.no_grad():
        for t in range(x.shape[1]):
            lstm_out, c = t_lstm(x[:, t], (h, c))
            out, h = t_cell(lstm_out, h, 1.0)
            outputs.append(out)
    return torch.stack(outputs, 1), (h, c)


@pytest.mark.parametrize("family,units", [("CfC", 12), ("CfC", "ncp"), ("LTC", 10), ("LTC", "ncp")])
def test_memory_circuit_input(family, units):
    """memory_circuit="input" is the ncps.tf/keras MixedMemoryRNN circuit (point 3)."""
    from test_parity_torch import wiring_pair
    from ncps.torch.lstm import LSTMCell

    torch.manual_seed(0)
    t_units, m_units = wiring_pair(units) if isinstance(units, str) else (units, units)
    m_model = getattr(ncps_mlx, family)(INPUT, m_units, mixed_memory=True, memory_circuit="input")
    state_size = m_model.state_size
    # The keras circuit's ODE cell reads the LSTM output, so it is built for state_size inputs.
    if family == "CfC":
        t_cell = (
            ncps_torch.CfCCell(state_size, state_size)
            if isinstance(t_units, int)
            else ncps_torch.WiredCfCCell(state_size, t_units)
        )
    else:
        from ncps.wirings import FullyConnected

        wiring = FullyConnected(t_units) if isinstance(t_units, int) else t_units
        t_cell = ncps_torch.LTCCell(wiring, state_size, implicit_param_constraints=True)
    t_lstm = LSTMCell(INPUT, state_size)
    holder = torch.nn.Module()
    holder.rnn_cell, holder.lstm = t_cell, t_lstm
    perturb_(holder, 1)
    load_torch_weights(m_model, holder)

    x = make_inputs(batch=3)
    t_out, t_state = torch_input_circuit(t_lstm, t_cell, torch.from_numpy(x))
    m_out, m_state = m_model(to_mlx(x))
    assert max_abs_diff(m_out, t_out) <= TOL
    assert max_abs_diff(m_state, t_state) <= TOL


def test_wired_motor_output():
    """motor_output=True slices a wired CfC's output to the motor neurons, as tf/keras (point 5)."""
    t_model, m_model = build("CfC", "fc", {}, {"motor_output": True})
    x = make_inputs(batch=3)
    (t_out, t_state), (m_out, m_state) = run_pair(t_model, m_model, x)
    assert t_out.shape[-1] == 16  # ncps.torch returns the whole last layer
    assert m_out.shape == (3, STEPS, 4) and m_model.output_size == 4
    assert max_abs_diff(m_out, t_out[..., :4]) <= TOL
    assert max_abs_diff(m_state, t_state) <= TOL


def test_motor_output_with_projection():
    """ncps.torch cannot project an unsliced FullyConnected(16, 4) CfC (its fc expects 4
    features but gets 16); ours sizes fc from what the cell really returns."""
    wiring = ncps_mlx.wirings.FullyConnected(16, 4)
    model = ncps_mlx.CfC(INPUT, wiring, proj_size=3)
    assert model.fc.weight.shape == (3, 16)
    sliced = ncps_mlx.CfC(INPUT, ncps_mlx.wirings.FullyConnected(16, 4), proj_size=3, motor_output=True)
    assert sliced.fc.weight.shape == (3, 4)
    x = mx.array(make_inputs(batch=2))
    assert model(x)[0].shape == sliced(x)[0].shape == (2, STEPS, 3)


def test_backbone_dropout_after_layers_2_to_n():
    """Reference-notes point 4: ncps.torch puts the backbone's dropout after layers 2..n only, so
    one backbone layer has none; with more, training draws fresh masks each call (one for each
    of layers 2..n) and inference has none."""
    x = mx.random.normal((4, 6, 3))
    single = ncps_mlx.CfC(3, 8, backbone_units=16, backbone_layers=1, backbone_dropout=0.5)
    single.train()
    assert single.rnn_cell.dropout_keep(4, 6) is None
    assert float(mx.max(mx.abs(single(x)[0] - single(x)[0]))) == 0.0
    double = ncps_mlx.CfC(3, 8, backbone_units=16, backbone_layers=3, backbone_dropout=0.5)
    double.train()
    keep = double.rnn_cell.dropout_keep(4, 6)
    assert keep.shape == (6, 2, 4, 16) and set(np.unique(np.array(keep)).tolist()) == {0.0, 2.0}
    assert float(mx.max(mx.abs(double(x)[0] - double(x)[0]))) > 0.0
    double.eval()
    assert float(mx.max(mx.abs(double(x)[0] - double(x)[0]))) == 0.0

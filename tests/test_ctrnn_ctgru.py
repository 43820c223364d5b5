"""CTRNN and CTGRU against the worked numbers of shared/docs/ctrnn-ctgru.md section 5.

Those numbers come from the LTC paper's TF1 code run in float64 (and an independent numpy
transcription); they are given to 6 significant figures, so 1e-5 leaves room only for that
rounding and float32.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import mlx.core as mx

from ncps_mlx import CTGRU, CTGRUCell, CTRNN, CTRNNCell

TOL = 1e-5

# --- CTRNN, I = 2, U = 3 ----------------------------------------------------------------------
K = np.array(
    [[0.5, -0.3, 0.2], [0.1, 0.4, -0.6], [0.2, -0.1, 0.0], [0.3, 0.1, -0.2], [-0.4, 0.0, 0.5]], dtype=np.float32
)  # TF layout (in, out), rows x1, x2, h1, h2, h3
B = np.array([0.1, -0.2, 0.05], dtype=np.float32)
X = np.array([[1.0, -0.5]], dtype=np.float32)
H0 = np.array([[0.5, -0.5, 0.25]], dtype=np.float32)


def ctrnn_cell(**kwargs):
    cell = CTRNNCell(2, 3, **kwargs)
    kernel = K if cell.global_feedback else K[:2]
    cell.step.weight = mx.array(kernel.T)
    cell.step.bias = mx.array(B)
    return cell


CTRNN_CASES = {
    "canonical": ({}, 1.0, [0.418959, -0.576957, 0.452513]),
    "no_global_feedback": ({"global_feedback": False}, 1.0, [0.500244, -0.548902, 0.367383]),
    "learn_tau": ({"learn_tau": True}, 1.0, [0.468814, -0.642431, 0.497900]),
    "delta_t_one_sixth": ({"delta_t": 1 / 6}, 1.0, [0.359923, -0.608992, 0.550741]),
    "timespan_2": ({}, 2.0, [0.330491, -0.620658, 0.590574]),
}


@pytest.mark.parametrize("case", sorted(CTRNN_CASES))
def test_ctrnn_worked_example(case):
    kwargs, ts, expected = CTRNN_CASES[case]
    out, h = ctrnn_cell(**kwargs)(mx.array(X), mx.array(H0), ts)
    assert np.max(np.abs(np.array(h)[0] - expected)) <= TOL
    assert np.array_equal(np.array(out), np.array(h))


def test_ctrnn_first_substep_f():
    cell = ctrnn_cell()
    u = cell.project_input(mx.array(X))
    f = mx.tanh(u + mx.array(H0) @ cell.step.weight[:, 2:].T)
    assert np.max(np.abs(np.array(f)[0] - [0.379949, -0.664037, 0.649827])) <= TOL


def test_ctrnn_closed_form_without_feedback():
    # Linear ODE with constant input: h = a^L h0 + tau (1 - a^L) f, a = 1 - eps / tau.
    cell = ctrnn_cell(global_feedback=False)
    _, h = cell(mx.array(X), mx.array(H0))
    f = np.tanh(X.astype(np.float64) @ K[:2] + B)
    a6 = 0.9**6
    assert np.max(np.abs(np.array(h) - (a6 * H0 + (1 - a6) * f))) <= 1e-6


def test_ctrnn_model_sequence_and_timespans():
    model = CTRNN(2, 3)
    model.rnn_cell.step.weight = mx.array(K.T)
    model.rnn_cell.step.bias = mx.array(B)
    x = mx.array(np.stack([X[0], X[0]])[None])  # (1, 2, 2): two steps of the same input
    out, h = model(x, mx.array(H0), timespans=mx.array([[1.0, 2.0]]))
    # Step 1 is the canonical h1; step 2 continues from it with dt = 2.
    cell = ctrnn_cell()
    _, h1 = cell(mx.array(X), mx.array(H0))
    _, h2 = cell(mx.array(X), h1, 2.0)
    assert np.max(np.abs(np.array(out[0, 0]) - [0.418959, -0.576957, 0.452513])) <= TOL
    assert np.max(np.abs(np.array(out[0, 1]) - np.array(h2)[0])) <= 1e-7
    assert np.array_equal(np.array(h), np.array(out[:, -1]))


def test_ctrnn_cell_clip():
    cell = ctrnn_cell(cell_clip=0.45)
    _, h = cell(mx.array(X), mx.array(H0))
    assert float(mx.max(mx.abs(h))) <= 0.45 + 1e-7
    assert abs(float(h[0, 1]) + 0.45) < 1e-7  # the canonical -0.577 is clipped


# --- CTGRU, I = 2, U = 3, M = 3 ----------------------------------------------------------------
def ctgru_cell(decay="ltc"):
    a = np.arange(5)[:, None]
    c = np.arange(9)[None, :]
    u = np.arange(3)[None, :]
    k_r = 0.3 * np.sin(1 + a + 2 * c)
    k_s = 0.3 * np.cos(2 + 2 * a + c)
    k_q = 0.4 * np.sin(3 + a - u)
    cell = CTGRUCell(2, 3, M=3, decay=decay)
    cell.tau_r.weight = mx.array(k_r.T.astype(np.float32))
    cell.tau_r.bias = mx.array((0.1 * np.cos(np.arange(9))).astype(np.float32))
    cell.tau_s.weight = mx.array(k_s.T.astype(np.float32))
    cell.tau_s.bias = mx.array((-0.1 * np.sin(np.arange(9))).astype(np.float32))
    cell.detect.weight = mx.array(k_q.T.astype(np.float32))
    cell.detect.bias = mx.array((0.05 * (np.arange(3) + 1)).astype(np.float32))
    return cell


TRACES0 = np.array([[0.1 * (u + 1) - 0.05 * i for i in range(3)] for u in range(3)], dtype=np.float32)
STATE0 = TRACES0.reshape(1, 9)  # unit-major

CTGRU_CASES = {
    "ltc": (
        [[0, 0.0266985, 0.000142581], [0, 0.0871194, 0.0669224], [0, 0.101799, 0.129527]],
        [0.0268411, 0.154042, 0.231325],
    ),
    "mozer": (
        [[0.0963749, 0.0463847, 0.000199178], [0.0949198, 0.151357, 0.0934876], [0.0566275, 0.176860, 0.180943]],
        [0.142959, 0.339764, 0.414430],
    ),
}


@pytest.mark.parametrize("decay", sorted(CTGRU_CASES))
def test_ctgru_worked_example(decay):
    traces, y = CTGRU_CASES[decay]
    out, state = ctgru_cell(decay)(mx.array(X), mx.array(STATE0))
    assert np.max(np.abs(np.array(state).reshape(3, 3) - traces)) <= TOL
    assert np.max(np.abs(np.array(out)[0] - y)) <= TOL


def test_ctgru_ltc_second_step():
    cell = ctgru_cell("ltc")
    _, state = cell(mx.array(X), mx.array(STATE0))
    out, _ = cell(mx.array(X), state)
    assert np.max(np.abs(np.array(out)[0] - [0.0180857, 0.131565, 0.133011])) <= TOL


def test_ctgru_decay_tables():
    cell = CTGRUCell(2, 3, M=8)
    code = [0, 0.419543, 0.647721, 0.748616, 0.804811, 0.840534, 0.865226, 0.883306]
    paper = [0.367879, 0.728893, 0.904837, 0.968872, 0.990050, 0.996843, 0.999000, 0.999684]
    assert np.max(np.abs(np.array(cell._ltc_decay) - code)) <= 1e-6
    assert np.max(np.abs(np.exp(-np.array(cell._inv_tau)) - paper)) <= 1e-6
    assert float(cell._ltc_decay[0]) == 0.0


def test_ctgru_mozer_uses_timespans_ltc_does_not():
    x = mx.array(np.tile(X, (1, 4, 1)))
    state = mx.array(STATE0)
    for decay, should_change in (("ltc", False), ("mozer", True)):
        model = CTGRU(2, 3, M=3, decay=decay)
        model.rnn_cell = ctgru_cell(decay)
        y1, _ = model(x, state)
        y2, _ = model(x, state, timespans=mx.array([[1.0, 0.5, 2.0, 3.0]]))
        assert (float(mx.max(mx.abs(y1 - y2))) > 1e-3) == should_change
        assert np.max(np.abs(np.array(y1[0, 0]) - CTGRU_CASES[decay][1])) <= TOL


def test_ctgru_parameter_shapes_and_init():
    cell = CTGRUCell(5, 4, M=8)
    assert cell.tau_r.weight.shape == (32, 9) and cell.tau_s.weight.shape == (32, 9)
    assert cell.detect.weight.shape == (4, 9)
    for layer in (cell.tau_r, cell.tau_s, cell.detect):
        assert float(mx.max(mx.abs(layer.bias))) == 0.0
    limit = math.sqrt(6 / (5 + 4 + 32))
    assert float(mx.max(mx.abs(cell.tau_r.weight))) <= limit
    assert cell.state_size == 32 and cell.output_size == 4

"""ncps-convert through a subprocess, as a user runs it: convert, inspect, verify, errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ncps_mlx

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "torch"
torch = pytest.importorskip("torch")
pytest.importorskip("ncps.torch")


def cli(*args, cwd=None):
    exe = Path(sys.executable).with_name("ncps-convert")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "ncps_mlx.converters.cli"]
    return subprocess.run(command + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_convert_verify_and_load(tmp_path):
    out = tmp_path / "cfc.safetensors"
    result = cli(FIXTURES / "cfc_autoncp.pt", "-o", out, "--config", FIXTURES / "cfc_autoncp.json")
    assert result.returncode == 0, result.stderr
    assert "PASSED" in result.stdout and "FAIL" not in result.stdout
    assert "[INFO] Wrote" in result.stderr
    model = ncps_mlx.load(out)
    assert type(model.wiring).__name__ == "AutoNCP"
    meta = ncps_mlx.converters.modelfile.read_metadata(out)
    assert meta["source"]["framework"] == "torch" and len(meta["source"]["sha256"]) == 64

    again = cli(FIXTURES / "cfc_autoncp.pt", "-o", out)
    assert again.returncode == 2 and "exists; pass --force" in again.stderr

    verified = cli("verify", FIXTURES / "cfc_autoncp.pt", out, "--json")
    assert verified.returncode == 0, verified.stderr
    report = json.loads(verified.stdout)
    (checked,) = report["reports"]
    assert report["passed"] and {c["tensor"] for c in checked["checks"]} == {"output", "state"}
    assert all(c["max_abs"] <= 1e-5 for c in checked["checks"])


def test_verify_fails_on_a_different_model(tmp_path):
    out = tmp_path / "other.safetensors"
    assert cli(FIXTURES / "cfc_default.pt", "-o", out, "--quiet").returncode == 0
    result = cli("verify", FIXTURES / "cfc_pure.pt", out)
    assert result.returncode == 1
    assert "FAIL" in result.stdout and "FAILED" in result.stdout


def test_convert_refuses_to_write_when_verification_fails(tmp_path, monkeypatch, capsys):
    """A check over its tolerance: here every check, with --atol 1e-30 and the allowance for the
    reference's own float32 error taken away (the rule is converters.verify's)."""
    from ncps_mlx.converters import cli as convert_cli, verify

    monkeypatch.setattr(verify, "REFERENCE_ERROR_MULTIPLE", 0.0)
    out = tmp_path / "strict.safetensors"
    assert convert_cli.main([str(FIXTURES / "ltc_fc.pt"), "-o", str(out), "--atol", "1e-30"]) == 1
    assert "not written" in capsys.readouterr().err and not out.exists()
    assert cli(FIXTURES / "ltc_fc.pt", "-o", out, "--no-verify", "--quiet").returncode == 0
    assert out.exists()


def test_convert_json_report(tmp_path):
    out = tmp_path / "ltc.safetensors"
    result = cli(FIXTURES / "ltc_mixed.pt", "-o", out, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["written"] and report["passed"] and report["verified"]
    assert {"output", "state h", "state c"} <= {c["tensor"] for c in report["reports"][0]["checks"]}
    assert result.stderr == ""  # --json implies no progress


def test_inspect(tmp_path):
    result = cli("inspect", FIXTURES / "ltc_ncp.pt", "--config", FIXTURES / "ltc_ncp.json")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "framework    torch, torch state dict" in text
    assert "model        LTC: input 4, state 9, output 2" in text
    assert "wiring       NCP: neurons per layer 4 / 3 / 2" in text
    assert "defaulted" in text and "ode_unfolds=6" in text
    (info,) = json.loads(cli("inspect", FIXTURES / "cfc_default.pt", "--json").stdout)["modules"]
    assert info["name"] == "" and info["inferred"]["units"] == 8 and info["inferred"]["backbone_units"] == 16
    assert info["defaulted"]["mode"] == "default" and info["recurrent"] == [{"class": "CfC", "state_size": 8, "wiring": None}]
    assert info["parameters"] > 0


def test_trust_pickle(tmp_path):
    out = tmp_path / "m.safetensors"
    refused = cli(FIXTURES / "cfc_module.pt", "-o", out)
    assert refused.returncode == 2 and "--trust-pickle" in refused.stderr and not out.exists()
    accepted = cli(FIXTURES / "cfc_module.pt", "-o", out, "--trust-pickle", "--quiet")
    assert accepted.returncode == 0, accepted.stderr
    assert ncps_mlx.load(out).get_config()["activation"] == "silu"


# --- unusable input: exit 2, one line on stderr, no output file --------------------------------


def _state_dict_file(tmp_path, edit):
    state = torch.load(FIXTURES / "cfc_default.pt", weights_only=True)
    edit(state)
    path = tmp_path / "edited.pt"
    torch.save(state, path)
    return path


def _bad_inputs(tmp_path):
    good = (FIXTURES / "cfc_default.pt").read_bytes()
    text = tmp_path / "notes.txt"
    text.write_text("this is not a checkpoint\n" * 10)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good[: len(good) // 2])
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(good[:60] + bytes(b ^ 0x5A for b in good[60:400]) + good[400:])
    truncated_st = tmp_path / "truncated.safetensors"
    truncated_st.write_bytes((FIXTURES / "cfc_default.safetensors").read_bytes()[:-100])
    lstm = tmp_path / "lstm.pt"
    torch.save(torch.nn.LSTM(4, 8).state_dict(), lstm)
    extra = _state_dict_file(tmp_path, lambda s: s.__setitem__("rnn_cell.bogus", torch.zeros(3)))
    missing_path = tmp_path / "missing_key.pt"
    state = torch.load(FIXTURES / "cfc_default.pt", weights_only=True)
    del state["rnn_cell.ff2.bias"]
    torch.save(state, missing_path)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{units: 8")
    unknown_key = tmp_path / "unknown.json"
    unknown_key.write_text(json.dumps({"class": "CfC", "hidden": 8}))
    contradicting = tmp_path / "contradicting.json"
    contradicting.write_text(json.dumps({"class": "CfC", "units": 32}))
    wrong_class = tmp_path / "ltc.json"
    wrong_class.write_text(json.dumps({"class": "LTC"}))
    pt = FIXTURES / "cfc_default.pt"
    return {
        "missing file": ([tmp_path / "nope.pt"], "no such file"),
        "not a checkpoint": ([text], "not a checkpoint"),
        "empty file": ([tmp_path / "empty.pt"], "empty"),
        "truncated": ([truncated], "truncated or corrupt"),
        "corrupt": ([corrupt], "corrupt"),
        "truncated safetensors": ([truncated_st], "truncated safetensors"),
        "another model": ([lstm], "not an ncps CfC or LTC checkpoint"),
        "unexpected key": ([extra], "unexpected tensors [rnn_cell.bogus]"),
        "missing key": ([missing_path], "missing tensors [rnn_cell.ff2.bias]"),
        "invalid JSON config": ([pt, "--config", bad_json], "is not JSON"),
        "unknown config key": ([pt, "--config", unknown_key], "unknown CfC option(s) ['hidden']"),
        "contradicting config": ([pt, "--config", contradicting], "says units=32 but the weights are for units=8"),
        "wrong class in config": ([pt, "--config", wrong_class], "describes a LTC but the checkpoint holds a CfC"),
        "missing config file": ([pt, "--config", tmp_path / "none.json"], "no such file"),
        "pickled module": ([FIXTURES / "cfc_module.pt"], "--trust-pickle"),
        "bad output suffix": ([pt, "-o", tmp_path / "model.npz"], "must end in .safetensors or .onnx"),
        "unknown option": ([pt, "--frobnicate"], "unrecognized arguments"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing file", "not a checkpoint", "empty file", "truncated", "corrupt", "truncated safetensors",
        "another model", "unexpected key", "missing key", "invalid JSON config", "unknown config key",
        "contradicting config", "wrong class in config", "missing config file", "pickled module",
        "bad output suffix", "unknown option",
    ],
)
def test_unusable_input(case, tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    args, message = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out.safetensors"
    if "-o" not in args:
        args = [*args, "-o", out]
    result = cli(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if not line.startswith("[INFO]")]
    assert len(errors) == 1 and errors[0].startswith("ncps-convert: error: "), result.stderr
    assert message in errors[0]
    assert "Traceback" not in result.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_debug_shows_the_traceback(tmp_path):
    text = tmp_path / "x.txt"
    text.write_text("nothing")
    result = cli(text, "-o", tmp_path / "o.safetensors", "--debug")
    assert result.returncode == 2 and "Traceback" in result.stderr


def test_inspect_and_verify_errors(tmp_path):
    result = cli("inspect", tmp_path / "missing.pt")
    assert result.returncode == 2 and "no such file" in result.stderr
    plain = tmp_path / "plain.safetensors"
    shutil.copy(FIXTURES / "cfc_default.safetensors", plain)
    result = cli("verify", FIXTURES / "cfc_default.pt", plain)
    assert result.returncode == 2 and "not an ncps-mlx model file" in result.stderr
    ltc_out = tmp_path / "ltc.safetensors"
    assert cli(FIXTURES / "ltc_fc.pt", "-o", ltc_out, "--quiet", "--no-verify").returncode == 0
    result = cli("verify", FIXTURES / "cfc_default.pt", ltc_out)
    assert result.returncode == 2 and "holds a LTC but" in result.stderr
    assert cli().returncode == 2
    assert cli("--help").returncode == 0


def test_convert_to_onnx_and_verify(tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "ltc.onnx"
    result = cli(FIXTURES / "ltc_ncp.pt", "--config", FIXTURES / "ltc_ncp.json", "-o", out, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    sources = [r["source"] for r in report["reports"]]
    assert sources[0].startswith("torch") and sources[1].startswith("ncps_mlx")
    assert all(r["target"].startswith("onnxruntime (ltc.onnx)") for r in report["reports"])
    assert report["passed"] and out.exists()
    verified = cli("verify", FIXTURES / "ltc_ncp.pt", out, "--config", FIXTURES / "ltc_ncp.json")
    assert verified.returncode == 0 and verified.stdout.count("PASSED") == 2
    other_size = cli("verify", FIXTURES / "ltc_fc.pt", out)
    assert other_size.returncode == 2 and "holds a LTC with input_size 4 and 9 units but the source" in other_size.stderr
    cfc = tmp_path / "cfc.onnx"
    assert cli(FIXTURES / "cfc_default.pt", "-o", cfc, "--quiet").returncode == 0
    wrong = cli("verify", FIXTURES / "cfc_no_gate.pt", cfc, "--config", FIXTURES / "cfc_no_gate.json")
    assert wrong.returncode == 1 and "FAIL" in wrong.stdout


def test_model_file_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    model_file = ncps_mlx.save(ncps_mlx.CTGRU(4, 3, M=4, decay="mozer"), tmp_path / "ctgru.safetensors")
    out = tmp_path / "ctgru.onnx"
    result = cli(model_file, "-o", out, "--quiet")
    assert result.returncode == 0, result.stderr
    assert "ncps_mlx (" in result.stdout and "PASSED" in result.stdout
    assert cli("inspect", model_file).returncode == 0

"""The dscoder command."""

from __future__ import annotations

import json
import subprocess
import sys

import dscoder
from dscoder.cli import main


def test_help_lists_commands(capsys):
    assert main([]) == 0
    assert "model" in capsys.readouterr().out
    proc = subprocess.run([sys.executable, "-m", "dscoder.cli", "model", "info", "--help"], capture_output=True,
                          text=True)
    assert proc.returncode == 0 and "PRESET_OR_DIR" in proc.stdout


def test_model_info_table_for_lite(capsys):
    assert main(["model", "info", "deepseek-coder-v2-lite"]) == 0
    out = capsys.readouterr().out
    assert "15.71B" in out and "31,104 bytes" in out and "276,480 expanded" in out
    assert out.count("MoE 64x1408 top-6 + 2 shared") == 26 and out.count("dense 10944") == 1


def test_model_info_json_on_a_checkpoint(tmp_path, capsys):
    model = dscoder.load_model("tiny")
    dscoder.save_model(model, tmp_path)
    assert main(["model", "info", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == model.num_parameters()
    assert info["activated_parameters"] == model.num_activated_parameters() < info["parameters"]
    assert [row["ffn"].split()[0] for row in info["layers"]] == ["dense", "MoE", "MoE"]


def test_unknown_source_is_one_line_error(capsys):
    assert main(["model", "info", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dscoder: error: no-such-model") and err.count("\n") == 1

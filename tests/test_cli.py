"""The dscoder command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

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


def test_undecodable_prompt_bytes_are_one_line(tiny_checkpoint, capsys):
    """A prompt with bytes that are not UTF-8 arrives as lone surrogates (os.fsdecode): one line, exit 2."""
    for argv in (["generate", "--model", str(tiny_checkpoint), "--max-tokens", "1", os.fsdecode(b"def f\xff")],
                 ["infill", "--model", str(tiny_checkpoint), "--max-tokens", "1", "--prefix", os.fsdecode(b"a\xfe"),
                  "--suffix", "b"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("dscoder: error: the text is not valid Unicode") and err.count("\n") == 1, err


def test_a_wrong_path_for_any_command_is_one_line(tiny_checkpoint, tmp_path, capsys):
    """Every command that takes a path, given one that is missing or damaged (a truncated safetensors file)."""
    cut = tmp_path / "cut"
    shutil.copytree(tiny_checkpoint, cut)
    weights = cut / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    nowhere = str(tmp_path / "nowhere")
    run = tmp_path / "run"  # a training run's layout: given where an HF checkpoint is expected
    (run / "checkpoints" / "step-000001").mkdir(parents=True)
    (run / "checkpoints" / "step-000001" / "meta.json").write_text("{}")
    (run / "config.json").write_text('{"model": {"preset": "tiny"}}')
    cases = [
        (["generate", "--model", nowhere, "x"], "no such checkpoint directory"),
        (["generate", "--model", str(cut), "x"], "not a readable safetensors file"),
        (["generate", "--model", str(tiny_checkpoint), "--tokenizer", nowhere, "x"], "not a tokenizer directory"),
        (["serve", "--model", nowhere], "no such checkpoint directory"),
        (["eval", "humaneval", "--model", nowhere, "--out", str(tmp_path / "o")], "no such checkpoint directory"),
        (["eval", "humaneval", "--samples", nowhere, "--out", str(tmp_path / "o")], "no such samples file"),
        (["export", nowhere, "--out", str(tmp_path / "o")], "no complete checkpoint"),
        (["train", "pretrain", "--config", nowhere, "--out", str(tmp_path / "o")], "config file not found"),
        (["data", "build", nowhere, "--out", str(tmp_path / "o")], "no such file or directory"),
        (["tokenizer", "train", "--data", nowhere, "--out", str(tmp_path / "o")], "expected the output of"),
        (["model", "info", nowhere], "no such checkpoint directory"),
        (["generate", "--model", str(run), "x"], "a training run or checkpoint, not an HF checkpoint; export it"),
        (["serve", "--model", str(run / "checkpoints" / "step-000001")], "not an HF checkpoint; export it first"),
    ]
    for argv, says in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("dscoder: error: ") and says in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "o").exists()


def test_the_package_imports_without_circles():
    """Every module imports alone (in a fresh package state); ``import dscoder`` does not pull in the engine,
    which builds on the model package rather than on ``dscoder/__init__``."""
    code = """
import importlib, pkgutil, sys
import dscoder
assert "dscoder.engine" not in sys.modules, "import dscoder imported the engine"
names = sorted(m.name for m in pkgutil.walk_packages(dscoder.__path__, "dscoder."))
failed = []
for name in names:
    for key in [k for k in sys.modules if k == "dscoder" or k.startswith("dscoder.")]:
        del sys.modules[key]
    try:
        importlib.import_module(name)
    except Exception as e:
        failed.append(f"import {name}: {type(e).__name__}: {e}")
assert not failed, "\\n".join(failed)
import dscoder
assert dscoder.Engine is importlib.import_module("dscoder.engine.engine").Engine
print(len(names))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout) > 40


def _import_graph(level: int) -> dict[str, set[str]]:
    """dscoder's modules and the dscoder modules each imports, anywhere in its text (at the top or inside a
    function: a deferred import still ties the two together), cut to the first ``level`` name parts
    (``dscoder.train.run`` at level 2 is ``dscoder.train``); a package's ``__init__`` is the package."""
    import ast

    root = Path(dscoder.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = ("dscoder",) + path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def owner(name: str) -> str:  # the module a dotted name lives in (``dscoder.io.write_json`` -> dscoder.io)
        while name not in modules:
            name = name.rpartition(".")[0]
        return name

    def cut(name: str) -> str:
        return ".".join(name.split(".")[:level])

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                if target == "dscoder" or target.startswith("dscoder."):
                    graph.setdefault(cut(name), set()).add(cut(owner(target)))
        graph.setdefault(cut(name), set())
    return {k: v - {k} for k, v in graph.items()}


@pytest.mark.parametrize("level", [9, 2], ids=["modules", "packages"])
def test_no_import_cycles(level):
    """No module imports one that imports it back, directly or round a circle, and no package does (so the
    layers stay layers: model <- engine <- serve, train <- align, ...). Python tolerates many cycles at run time;
    this reads the source, so a cycle fails here even when the order of imports happens to work."""
    import graphlib

    graph = _import_graph(level)
    assert len(graph) > (40 if level > 2 else 10)
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle: {' -> '.join(e.args[1])}")


def test_library_calls_leave_global_state_alone(tiny_checkpoint):
    """Building or loading a model and opening an engine change nothing process-wide: the caller's random stream,
    dynamo's recompile limit, the thread count, the warning filters and the environment stay as they were."""
    import warnings

    import torch
    import torch._dynamo.config as dynamo_config

    from dscoder.engine import Engine
    from dscoder.model.moe import grouped_mm_works

    grouped_mm_works.cache_clear()  # the first forward's one-off probe is part of what is checked

    def state():
        return (dynamo_config.recompile_limit, torch.get_num_threads(), list(warnings.filters), dict(os.environ))

    before = state()
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    a = dscoder.load_model("tiny")  # seeded weights (seed=0) ...
    b = dscoder.build_model(dscoder.ModelConfig.preset("tiny"), seed=0)
    with Engine(tiny_checkpoint) as engine:
        engine.generate("def f(x):", max_tokens=2)
    assert torch.equal(torch.rand(4), expected)  # ... drawn without touching the caller's generator
    assert torch.equal(a.model.embed_tokens.weight, b.model.embed_tokens.weight)
    assert state() == before


def test_recipes_by_file_or_packaged_name(tmp_path, monkeypatch):
    from dscoder.errors import ConfigError
    from dscoder.recipes import recipe_names, recipe_path
    from dscoder.train.config import TrainConfig

    packaged = Path(dscoder.__file__).parent / "configs"
    assert {"tiny", "tiny-long-context", "coder-v2-lite", "coder-v2", "sft-tiny", "reward-tiny",
            "grpo-tiny"} <= set(recipe_names())
    mine = tmp_path / "tiny.toml"
    mine.write_text("# my own recipe\n")
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: README's paths and bare names find the packaged ones
    assert recipe_path("tiny.toml").resolve() == mine  # a file that exists is taken as given
    assert recipe_path("tiny") == recipe_path("configs/tiny.toml") == packaged / "tiny.toml"
    assert TrainConfig.load("tiny").train.steps == TrainConfig.load(packaged / "tiny.toml").train.steps
    with pytest.raises(ConfigError, match="no-such: config file not found .packaged recipes: coder-v2, "):
        recipe_path("no-such")
    with pytest.raises(ConfigError, match="elsewhere/tiny.toml: config file not found"):
        recipe_path("elsewhere/tiny.toml")  # only a bare name or configs/NAME means a packaged recipe
    with pytest.raises(ConfigError, match="not a recipe file"):
        recipe_path(tmp_path)


def test_recipes_ship_in_the_wheel_and_resolve_when_installed(tmp_path):
    """Built as a wheel and put on a path with no checkout nearby, ``--config tiny`` still finds its recipe."""
    pytest.importorskip("setuptools")
    repo = Path(__file__).resolve().parents[1]
    src = tmp_path / "project"
    shutil.copytree(repo / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
                           "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    site = tmp_path / "site"
    with zipfile.ZipFile(next((tmp_path / "dist").glob("dscoder-*.whl"))) as wheel:
        assert "dscoder/configs/tiny.toml" in wheel.namelist()
        wheel.extractall(site)
    code = ("import dscoder.recipes as r; from dscoder.train.config import TrainConfig; "
            "print(r.recipe_path('tiny')); TrainConfig.load('tiny')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(site)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert Path(run.stdout.strip()) == site / "dscoder" / "configs" / "tiny.toml"

"""Pre-training: the loss falls, resume is exact, torchrun DDP/FSDP2 match one process, export loads in transformers."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import jsonl_rows, torchrun
from dscoder.cli import main
from dscoder.errors import CheckpointError, ConfigError, DscoderError
from dscoder.train.config import TrainConfig
from dscoder.train.pretrain import pretrain

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(stdlib_build):
    """A small real corpus: two standard-library packages, built with a 512-token BPE."""
    return stdlib_build


def _config(data_dir, *overrides):
    return TrainConfig.load(ROOT / "configs" / "tiny.toml",
                            [f"data.path={data_dir}", "data.seq_len=64", "train.micro_batch=4",
                             "train.warmup_steps=2", "train.log_every=1", *overrides])


def _losses(run: Path) -> list[float]:
    return [row["loss"] for row in jsonl_rows(run / "metrics.jsonl")]


def test_loss_falls(data_dir, tmp_path):
    last = pretrain(_config(data_dir, "train.steps=120", "train.ckpt_every=120", "train.micro_batch=8"),
                    tmp_path / "run")
    losses = _losses(tmp_path / "run")
    assert len(losses) == 120 and last["step"] == 120
    assert sum(losses[-10:]) / 10 < sum(losses[:5]) / 5 - 1.0, losses  # from ln(512) ≈ 6.2 nats
    rows = jsonl_rows(tmp_path / "run" / "metrics.jsonl")
    assert all(r["aux_loss"] > 0 and r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in rows)
    assert rows[0]["expert_load_max"] >= 1.0 and rows[1]["lr"] > rows[0]["lr"]  # warmup
    assert (tmp_path / "run" / "loss.png").exists()


def test_resume_is_exact_and_ignores_a_cut_off_checkpoint(data_dir, tmp_path):
    cfg = _config(data_dir, "train.steps=8", "train.ckpt_every=4")
    pretrain(cfg, tmp_path / "full")
    pretrain(cfg, tmp_path / "cut", max_steps=4)  # as if killed right after the step-4 checkpoint
    junk = tmp_path / "cut" / "checkpoints" / "step-000006.tmp"  # a save that died half-way
    junk.mkdir()
    (junk / "rank-00000.json").write_text("{")
    with pytest.raises(DscoderError, match="already holds checkpoints"):
        pretrain(cfg, tmp_path / "cut")
    pretrain(cfg, tmp_path / "cut", resume=True)
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "full")  # bitwise, fp32 on CPU
    assert not junk.exists()


def test_checkpoint_from_another_config_is_refused(data_dir, tmp_path):
    pretrain(_config(data_dir, "train.steps=2", "train.ckpt_every=2"), tmp_path / "run")
    with pytest.raises(CheckpointError, match="saved with another model config \\(kv_lora_rank\\)"):
        pretrain(_config(data_dir, "train.steps=4", "model.kv_lora_rank=16"), tmp_path / "run", resume=True)


def test_export_loads_in_transformers(data_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    pretrain(_config(data_dir, "train.steps=3", "train.ckpt_every=3"), tmp_path / "run")
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    import dscoder
    from dscoder.tokenizer import Tokenizer

    ours = dscoder.load_model(tmp_path / "hf")
    theirs = transformers.DeepseekV2ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = Tokenizer.load(tmp_path / "hf")
    ids = torch.tensor([tok.encode("def add(a, b):\n    return a + b\n")])
    with torch.no_grad():
        assert (ours(ids).logits - theirs(ids).logits).abs().max().item() <= 1e-4
    # and training can start again from the export (continued pre-training)
    pretrain(_config(data_dir, "train.steps=1", "model.init=" + str(tmp_path / "hf"), "model.preset=''"),
             tmp_path / "again")


def test_bad_input(data_dir, tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown config key 'train.stepz'"):
        _config(data_dir, "train.stepz=3")
    with pytest.raises(ConfigError, match="unknown config key 'model.n_expertz'"):
        _config(data_dir, "model.n_expertz=3")
    with pytest.raises(ConfigError, match="train.steps = 'x': expected an integer"):
        _config(data_dir, "train.steps=x")
    with pytest.raises(DscoderError, match="not a `dscoder data build` output"):
        pretrain(_config(tmp_path, "train.steps=1"), tmp_path / "run")
    assert main(["train", "pretrain", "--config", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "r")]) == 2
    assert "nope.toml: config file not found" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "hf")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


def _torchrun(data_dir, out: Path, strategy: str) -> list[float]:
    proc = torchrun("train", "pretrain", "--config", "tiny", "--out", str(out), f"data.path={data_dir}",
                    "data.seq_len=64", "data.shard=rows", "train.micro_batch=2", "train.steps=4",
                    "train.warmup_steps=2", "train.ckpt_every=4", f"parallel.strategy={strategy}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _losses(out)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_matches_one_process(data_dir, tmp_path, strategy):
    pretrain(_config(data_dir, "data.shard=rows", "train.micro_batch=4", "train.steps=4", "train.ckpt_every=4"),
             tmp_path / "one")
    two = _torchrun(data_dir, tmp_path / "two", strategy)
    one = _losses(tmp_path / "one")
    assert len(two) == 4
    # same global batch of 4 rows: 1 x 4 rows vs 2 ranks x 2 rows; only float summation order differs
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-4, (one, two)


def test_long_context_stages_and_activation_checkpointing(data_dir, tmp_path):
    stages = "stages=[{steps=4, seq_len=32}, {steps=4, seq_len=96, micro_batch=2, rope_factor=8.0}]"
    pretrain(_config(data_dir, stages, "train.ckpt_every=4"), tmp_path / "run")
    rows = jsonl_rows(tmp_path / "run" / "metrics.jsonl")
    assert [r["seq_len"] for r in rows] == [32] * 4 + [96] * 4
    assert rows[4]["lr"] == rows[0]["lr"] < rows[1]["lr"] and rows[3]["lr"] < rows[1]["lr"]  # a schedule per stage
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rope_scaling"]["factor"] == 8.0 and config["max_position_embeddings"] == 8 * 256
    # resuming at the stage boundary finds the stage-1 checkpoint consistent with the plan
    pretrain(_config(data_dir, stages, "train.ckpt_every=4"), tmp_path / "cut", max_steps=4)
    pretrain(_config(data_dir, stages, "train.ckpt_every=4"), tmp_path / "cut", resume=True)
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "run")
    # activation checkpointing recomputes the same numbers
    pretrain(_config(data_dir, "train.steps=2", "train.activation_checkpointing=true"), tmp_path / "ac")
    pretrain(_config(data_dir, "train.steps=2"), tmp_path / "plain")
    assert _losses(tmp_path / "ac") == pytest.approx(_losses(tmp_path / "plain"), abs=1e-6)


def test_long_context_recipe_runs(data_dir, tmp_path):
    pretrain(_config(data_dir, "train.steps=2", "train.ckpt_every=2"), tmp_path / "base")
    assert main(["export", str(tmp_path / "base"), "--out", str(tmp_path / "hf")]) == 0
    config = TrainConfig.load(ROOT / "configs" / "tiny-long-context.toml", [
        f"model.init={tmp_path / 'hf'}", "stages=[{steps=1, seq_len=128, micro_batch=1, rope_factor=8.0}]",
        f"data.sources=[{{path='{data_dir}', weight=0.5}}, {{path='{data_dir}', weight=0.5, min_tokens=1024}}]"])
    last = pretrain(config, tmp_path / "long")
    assert last["seq_len"] == 128 and last["step"] == 1


def test_init_with_overrides_reuses_the_loaded_weights():
    """model.init + non-shape overrides: a new config over the same tensors (no second copy); shape changes refused."""
    import dscoder
    from dscoder.train.run import rebuild as _rebuild_with

    model = dscoder.build_model(dscoder.ModelConfig.preset("tiny"), seed=0)
    cfg = model.config.replace(aux_loss_alpha=0.05)
    fresh = _rebuild_with(model, cfg)
    assert fresh.config.aux_loss_alpha == 0.05 and fresh.model.layers[1].mlp.config.aux_loss_alpha == 0.05
    assert fresh.lm_head.weight.data_ptr() == model.lm_head.weight.data_ptr()
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(ids).logits, model.eval()(ids).logits)
    with pytest.raises(ConfigError, match="change the shapes"):
        _rebuild_with(model, model.config.replace(moe_intermediate_size=8))


# ----- faults: damaged checkpoints, non-finite losses, bad metrics, exports, lengths --------------------------------
def _damage(path: Path, how: str) -> None:
    """Damage a checkpoint as a disk, a copy or a stray write would."""
    if how == "metadata":
        (path / ".metadata").unlink()
        return
    shard = sorted(path.glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    if how == "truncate":
        shard.write_bytes(data[:len(data) // 2])
    else:  # the bytes of the float tensors become NaN; the size stays the same
        data[len(data) // 3:len(data) // 3 + 4096] = b"\xff" * 4096
        shard.write_bytes(data)


def _messages(capsys) -> list[str]:
    """dscoder's own lines on stderr (not the progress bars)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("dscoder:")]


def test_resume_skips_a_damaged_checkpoint_and_pruning_keeps_the_good_ones(data_dir, tmp_path, capsys):
    from dscoder.train import checkpoint as ckpt

    cfg = _config(data_dir, "train.steps=12", "train.ckpt_every=4")
    pretrain(cfg, tmp_path / "full")
    run = tmp_path / "cut"
    pretrain(cfg, run, max_steps=8)  # killed after the step-8 checkpoint
    steps = lambda: [p.name for p in ckpt.checkpoints(run)]  # noqa: E731
    assert steps() == ["step-000004", "step-000008"]
    _damage(run / "checkpoints" / "step-000008", "overwrite")
    assert "does not match its checksum" in ckpt.verify(run / "checkpoints" / "step-000008")
    capsys.readouterr()
    pretrain(cfg, run, resume=True)  # falls back to step 4 with one warning line, and never trains on NaN
    err = _messages(capsys)
    assert len(err) == 1 and "step-000008: damaged" in err[0] and "does not match its checksum" in err[0], err
    assert _losses(run) == _losses(tmp_path / "full")
    assert steps() == ["step-000008", "step-000012"] and all(ckpt.verify(p) is None for p in ckpt.checkpoints(run))
    # pruning counts only intact checkpoints: two damaged newer ones never push the last good one out
    _damage(run / "checkpoints" / "step-000008", "truncate")
    _damage(run / "checkpoints" / "step-000012", "metadata")
    assert "bytes, " in ckpt.verify(run / "checkpoints" / "step-000008", deep=False)
    assert ".metadata is missing" in ckpt.verify(run / "checkpoints" / "step-000012", deep=False)
    good = tmp_path / "good"
    pretrain(_config(data_dir, "train.steps=4", "train.ckpt_every=2", "train.keep_checkpoints=3"), good)
    shutil.copytree(run / "checkpoints" / "step-000008", good / "checkpoints" / "step-000008")
    shutil.copytree(run / "checkpoints" / "step-000012", good / "checkpoints" / "step-000012")
    ckpt.prune(good, keep=2)
    assert [p.name for p in ckpt.checkpoints(good)] == ["step-000002", "step-000004", "step-000008", "step-000012"]
    # none intact: one line, exit 2, nothing trained
    argv = ["train", "pretrain", "--config", str(ROOT / "configs" / "tiny.toml"), "--out", str(run), "--resume",
            f"data.path={data_dir}", "data.seq_len=64", "train.micro_batch=4", "train.steps=12", "train.ckpt_every=4"]
    assert main(argv) == 2
    err = _messages(capsys)
    assert err[-1].startswith("dscoder: error:") and "no intact checkpoint to resume from" in err[-1], err


def test_checkpoint_from_before_manifests_resumes_with_a_warning(data_dir, tmp_path, capsys):
    from dscoder.train import checkpoint as ckpt

    cfg = _config(data_dir, "train.steps=4", "train.ckpt_every=2")
    pretrain(cfg, tmp_path / "full")
    run = tmp_path / "old"
    pretrain(cfg, run, max_steps=2)
    (run / "checkpoints" / "step-000002" / ckpt.MANIFEST).unlink()  # as an older dscoder wrote it
    assert ckpt.verify(run / "checkpoints" / "step-000002") is None
    capsys.readouterr()
    pretrain(cfg, run, resume=True)
    err = _messages(capsys)
    assert len(err) == 1 and "resuming from it unverified" in err[0], err
    assert _losses(run) == _losses(tmp_path / "full")
    (run / "checkpoints" / "step-000004" / ckpt.MANIFEST).unlink()
    (run / "checkpoints" / "step-000004" / ".metadata").unlink()  # without a manifest, what it must hold is checked
    assert ckpt.verify(run / "checkpoints" / "step-000004") == ".metadata is missing"


def test_nonfinite_loss_stops_the_run_before_saving_it(data_dir, tmp_path, capsys):
    import dscoder
    from dscoder.train import checkpoint as ckpt

    run = tmp_path / "run"
    argv = ["train", "pretrain", "--config", str(ROOT / "configs" / "tiny.toml"), "--out", str(run),
            f"data.path={data_dir}", "data.seq_len=64", "train.micro_batch=4", "train.steps=6", "train.ckpt_every=1",
            "train.warmup_steps=0", "train.lr=1e30", "train.keep_checkpoints=10"]
    assert main(argv) == 2
    err = _messages(capsys)
    assert len(err) == 1 and err[0].startswith("dscoder: error: step ") and "the run stopped" in err[0], err
    failed = int(err[0].split("step ")[1].split(":")[0])
    saved = ckpt.checkpoints(run)
    assert [int(p.name.split("-")[1]) for p in saved] == list(range(1, failed))  # nothing at or after the bad step
    for path in saved:
        model = dscoder.build_model(dscoder.ModelConfig.from_hf_dict(ckpt.read_meta(path)["model"]))
        ckpt.load_model_weights(path, model)
        assert all(torch.isfinite(t).all() for t in model.state_dict().values()), path


def test_garbage_metrics_on_resume_is_one_line(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    pretrain(_config(data_dir, "train.steps=4", "train.ckpt_every=2"), run, max_steps=2)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.0\n')
    argv = ["train", "pretrain", "--config", str(ROOT / "configs" / "tiny.toml"), "--out", str(run), "--resume",
            f"data.path={data_dir}", "data.seq_len=64", "train.micro_batch=4", "train.steps=4", "train.ckpt_every=2"]
    assert main(argv) == 2
    err = _messages(capsys)
    assert len(err) == 1 and "metrics.jsonl:3: not valid JSON" in err[0] and "Traceback" not in err[0], err
    (run / "metrics.jsonl").write_text('{"loss": 1.0}\n')
    assert main(argv) == 2
    assert "metrics.jsonl:1: expected a metrics row with an integer 'step'" in _messages(capsys)[0]


def test_export_protects_the_run_and_keeps_the_tokenizer(data_dir, tmp_path, capsys):
    import dscoder
    from dscoder.train import checkpoint as ckpt

    run = tmp_path / "run"
    pretrain(_config(data_dir, "train.steps=2", "train.ckpt_every=2"), run)
    config_before = (run / "config.json").read_bytes()
    (tmp_path / "file").write_text("mine")
    for out, needle in ((tmp_path / "file", "is an existing file"), (run, "is the run directory itself"),
                        (run / "checkpoints" / "x", "inside the run's checkpoints/"),
                        (tmp_path / "run" / ".", "is the run directory itself")):
        assert main(["export", str(run), "--out", str(out)]) == 2
        err = _messages(capsys)
        assert len(err) == 1 and needle in err[0], err
    assert (run / "config.json").read_bytes() == config_before and (tmp_path / "file").read_text() == "mine"
    assert main(["export", str(run), "--out", str(tmp_path / "other")]) == 0
    # the run kept its own copy of the tokenizer: the export has it, whatever happens to the data build
    assert ckpt.read_meta(ckpt.checkpoints(run)[-1])["tokenizer"] == "tokenizer"
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert _messages(capsys) == []
    for name in ("model.safetensors", "config.json", "tokenizer.json", "dscoder_training_meta.json"):
        assert (tmp_path / "hf" / name).stat().st_mode & 0o777 == 0o644, name
    # a run without a tokenizer and with non-finite weights: exported, with one warning line for each
    model = dscoder.build_model(dscoder.ModelConfig.preset("tiny"), seed=0)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    optimizer = torch.optim.AdamW(model.parameters())
    ckpt.save(tmp_path / "nan", 1, model, optimizer, extra={"step": 1}, meta={"model": model.config.to_hf_dict()},
              keep=1)
    assert main(["export", str(tmp_path / "nan"), "--out", str(tmp_path / "nan-hf")]) == 0
    err = _messages(capsys)
    assert len(err) == 2 and "1 tensors hold NaN or infinite values (first: model.norm.weight)" in err[0], err
    assert "the run has no tokenizer" in err[1]
    assert main(["export", str(tmp_path / "nan"), "--out", str(run)]) == 2  # into another run: refused
    assert "--out holds a training run" in _messages(capsys)[0]
    # and training into the export (an HF checkpoint, not a run) is refused too: its config.json stays
    before = (tmp_path / "hf" / "config.json").read_bytes()
    with pytest.raises(DscoderError, match="holds a config.json that is not a training run's"):
        pretrain(_config(data_dir, "train.steps=1"), tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").read_bytes() == before


def test_seq_len_past_the_context_is_refused(data_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"data.seq_len = 4096: longer than the model's context, "
                                          r"max_position_embeddings = 1024 \(YaRN-scaled\)"):
        pretrain(_config(data_dir, "data.seq_len=4096"), tmp_path / "a")
    with pytest.raises(ConfigError, match=r"stages\[1\].seq_len = 4096: .* max_position_embeddings = 2048"):
        pretrain(_config(data_dir, "stages=[{steps=1, seq_len=64}, {steps=1, seq_len=4096, rope_factor=8.0}]"),
                 tmp_path / "b")
    assert not (tmp_path / "a" / "checkpoints").exists()


def test_recipe_that_is_not_utf8_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "bad.toml"
    recipe.write_bytes(b"[train]\nsteps = 1 # \xff\xfe\n")
    assert main(["train", "pretrain", "--config", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = _messages(capsys)
    assert err == [f"dscoder: error: {recipe}: not a TOML file (not valid UTF-8 at byte 20)"], err


def test_training_into_a_data_build_is_refused(data_dir, tmp_path):
    """--out naming the data build would put a run (and a tokenizer copy over its own) into it."""
    build = tmp_path / "build"
    shutil.copytree(data_dir, build)
    before = sorted(p.relative_to(build) for p in build.rglob("*"))
    with pytest.raises(DscoderError, match="holds a data build"):
        pretrain(_config(build, "train.steps=1"), build)
    assert sorted(p.relative_to(build) for p in build.rglob("*")) == before


def test_export_refuses_a_folder_holding_other_files(tmp_path, capsys):
    """Only a new or empty directory, or one holding nothing but an earlier export, is written over."""
    import dscoder
    from dscoder.train import checkpoint as ckpt

    model = dscoder.build_model(dscoder.ModelConfig.preset("tiny"), seed=0)
    ckpt.save(tmp_path / "run", 1, model, torch.optim.AdamW(model.parameters()), extra={"step": 1},
              meta={"model": model.config.to_hf_dict()}, keep=1)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"mine": true}')
    (mine / "notes.md").write_text("mine")
    assert main(["export", str(tmp_path / "run"), "--out", str(mine)]) == 2
    err = _messages(capsys)
    assert len(err) == 1 and "holds files an export does not write (notes.md)" in err[0], err
    assert (mine / "config.json").read_text() == '{"mine": true}'
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "empty"):  # an empty folder, then the earlier export it now holds
        assert main(["export", str(tmp_path / "run"), "--out", str(out)]) == 0
    (tmp_path / "empty" / ".model.safetensors.x1y2.tmp").write_bytes(b"")  # what an interrupted export leaves
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "empty")]) == 0


def test_ctrl_c_stops_training_in_one_line_and_resume_goes_on(data_dir, tmp_path):
    """SIGINT while pre-training: exit 130 with one line, no traceback; --resume continues from the newest
    checkpoint and the metrics hold every step once."""
    import signal
    import subprocess
    import sys
    import time

    from dscoder.train import checkpoint as ckpt

    run = tmp_path / "run"
    argv = ["train", "pretrain", "--config", str(ROOT / "configs" / "tiny.toml"), "--out", str(run),
            f"data.path={data_dir}", "data.seq_len=64", "train.micro_batch=2", "train.ckpt_every=2"]
    proc = subprocess.Popen([sys.executable, "-m", "dscoder.cli", *argv, "train.steps=100000"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal's Ctrl-C
    try:
        deadline = time.monotonic() + 180
        while not ckpt.checkpoints(run) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None and ckpt.checkpoints(run), "no checkpoint written"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("dscoder")]
    assert proc.returncode == 130 and lines == ["dscoder: interrupted"] and "Traceback" not in err, err[-2000:]
    step = int(ckpt.checkpoints(run)[-1].name.split("-")[1])
    assert main([*argv[:6], "--resume", *argv[6:], f"train.steps={step + 2}"]) == 0
    assert [row["step"] for row in jsonl_rows(run / "metrics.jsonl")] == list(range(1, step + 3))


def test_ctrl_c_during_a_save_stops_after_it():
    """DCP turns a KeyboardInterrupt inside its writers into a CheckpointException: a save defers Ctrl-C to its end."""
    import os
    import signal

    from dscoder.train import checkpoint as ckpt

    done = []
    # Python's own Ctrl-C handler, as a terminal's python has it (a shell's background job starts with SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with ckpt._interrupts_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                done.append("the save went on")
        assert done == ["the save went on"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_packaged_recipe_with_model_init_override(tmp_path):
    """configs/sft-tiny.toml says preset = "tiny"; its documented `model.init=DIR` override replaces the preset."""
    from dscoder.align.recipe import load_recipe
    from dscoder.align.sft import SFTData, SFTSection

    cfg = load_recipe("sft-tiny", [f"model.init={tmp_path}"], "sft", SFTData, SFTSection)
    assert cfg.model.init == str(tmp_path) and cfg.model.preset is None
    cfg = TrainConfig.load(ROOT / "configs" / "tiny.toml", ["data.path=x", f"model.init={tmp_path}"])
    assert cfg.model.init == str(tmp_path) and cfg.model.preset is None
    with pytest.raises(ConfigError, match="not both"):  # both given on the command line: still refused
        TrainConfig.load(ROOT / "configs" / "tiny.toml", ["data.path=x", "model.preset=tiny", f"model.init={tmp_path}"])


def test_overrides_before_and_after_options(data_dir, tmp_path):
    """KEY=VALUE overrides may stand before --out as well as after it (argparse took only one run of them)."""
    out = tmp_path / "run"
    assert main(["train", "pretrain", "--config", "tiny", f"data.path={data_dir}", "data.seq_len=32", "--out",
                 str(out), "train.steps=1", "train.micro_batch=2", "train.warmup_steps=1", "train.ckpt_every=1"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["seq_len"] == 32 and cfg["train"]["steps"] == 1
    with pytest.raises(SystemExit):
        main(["train", "pretrain", "--config", "tiny", "--out", str(tmp_path / "r2"), "--bogus"])


def test_export_average_is_the_mean_of_the_last_checkpoints(tmp_path, capsys):
    """--average N: the mean of the checkpoint's weights and the N-1 before it (a checkpoint names where the
    stretch ends); too few checkpoints, N < 1, a damaged one or --format gguf: one line, exit 2."""
    import dscoder
    from dscoder.train import checkpoint as ckpt

    run = tmp_path / "run"
    weights = []
    for step in (1, 2, 3):
        model = dscoder.build_model(dscoder.ModelConfig.preset("tiny"), seed=step)
        weights.append(model.state_dict())
        ckpt.save(run, step, model, torch.optim.AdamW(model.parameters()), extra={"step": step},
                  meta={"model": model.config.to_hf_dict()}, keep=3)
    for i, (argv, mean_of) in enumerate(((["--average", "2"], (1, 2)), (["--average", "1"], (2,)),
                                         ([], (2,)), (["--average", "3"], (0, 1, 2)))):
        out = tmp_path / f"hf{i}"
        assert main(["export", str(run), "--out", str(out), *argv]) == 0, capsys.readouterr().err
        got = dscoder.load_model(out).state_dict()
        for name, t in got.items():
            want = sum(weights[i][name] for i in mean_of) / len(mean_of)
            torch.testing.assert_close(t, want, rtol=1e-6, atol=1e-6, msg=name)
    averaged = json.loads((tmp_path / "hf3" / "dscoder_training_meta.json").read_text())["averaged"]
    assert averaged == ["step-000001", "step-000002", "step-000003"]
    out = tmp_path / "hf_step2"
    assert main(["export", str(ckpt.checkpoints(run)[1]), "--out", str(out), "--average", "2"]) == 0
    torch.testing.assert_close(dscoder.load_model(out).state_dict()["model.embed_tokens.weight"],
                               (weights[0]["model.embed_tokens.weight"] + weights[1]["model.embed_tokens.weight"]) / 2)
    capsys.readouterr()
    for argv, needle in ((["--average", "4"], "--average 4 needs 4 checkpoints up to step-000003; the run keeps 3"),
                         (["--average", "0"], "--average 0: expected a whole number of checkpoints, at least 1"),
                         (["--average", "2", "--format", "gguf"], "--average is for --format hf")):
        assert main(["export", str(run), "--out", str(tmp_path / "x.gguf" if "gguf" in argv else tmp_path / "x"),
                     *argv]) == 2
        err = _messages(capsys)
        assert len(err) == 1 and needle in err[0], err
    with open(next((ckpt.checkpoints(run)[1]).glob("*.distcp")), "r+b") as f:  # bytes changed after the save
        f.seek(100)
        f.write(b"\x00garbage\x00")
    assert main(["export", str(run), "--out", str(tmp_path / "x"), "--average", "2"]) == 2
    err = _messages(capsys)
    assert len(err) == 1 and "step-000002: damaged checkpoint" in err[0], err
    assert main(["export", str(run), "--out", str(tmp_path / "x")]) == 0  # the newest alone is intact
    capsys.readouterr()  # its warning: the run has no tokenizer
    shutil.copytree(ckpt.checkpoints(run)[-1], tmp_path / "loose" / "step-000003")  # a checkpoint outside a run
    assert main(["export", str(tmp_path / "loose" / "step-000003"), "--out", str(tmp_path / "y"), "--average", "2"]) == 2
    err = _messages(capsys)
    assert len(err) == 1 and "--average needs a checkpoint inside a run" in err[0], err
    other = dscoder.build_model(dataclasses.replace(dscoder.ModelConfig.preset("tiny"), kv_lora_rank=16), seed=4)
    ckpt.save(run, 4, other, torch.optim.AdamW(other.parameters()), extra={"step": 4},
              meta={"model": other.config.to_hf_dict()}, keep=4)
    assert main(["export", str(run), "--out", str(tmp_path / "y"), "--average", "2"]) == 2
    err = _messages(capsys)
    assert len(err) == 1 and "another model config than step-000004" in err[0], err

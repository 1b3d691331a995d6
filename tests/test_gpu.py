"""The CUDA paths, each against a plain reference: grouped GEMM experts, the model on the GPU against the CPU, bf16
autocast training, compiled decode against eager decode, FSDP2 over NCCL, pre-training from the command line.

Every test runs only where a CUDA GPU is present (``benchmarks/gpu_suite.sh`` runs them with the GPU benchmarks);
elsewhere they are skipped. The multi-GPU tests also need 2 GPUs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import dscoder
from conftest import jsonl_rows, tiny_config, torchrun
from dscoder.cli import main

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ROOT = Path(__file__).resolve().parents[1]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
try:  # the data build behind the pre-training tests (a GPU machine may have torch and little else)
    import datatrove  # noqa: F401
    needs_data_build = pytest.mark.skipif(False, reason="")
except ImportError:
    needs_data_build = pytest.mark.skip(reason="needs datatrove (dscoder data build) for the training data")


def _routing(N: int, E: int, K: int, device: str):
    g = torch.Generator().manual_seed(0)
    experts = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)]).to(device)
    weights = torch.rand(N, K, generator=g).to(device)
    return weights, experts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grouped_gemm_experts_match_the_loop(dtype):
    """RoutedExperts on CUDA (torch._grouped_mm where it runs, else the gathered path) against one matmul per
    expert, forward and backward."""
    from dscoder.model.moe import RoutedExperts, grouped_mm_works

    cfg = tiny_config(hidden_size=256, moe_intermediate_size=128, n_routed_experts=16, num_experts_per_tok=4)
    torch.manual_seed(0)
    experts = RoutedExperts(cfg).cuda()
    torch.nn.init.normal_(experts.gate_up_proj, std=0.05)
    torch.nn.init.normal_(experts.down_proj, std=0.05)
    experts = experts.to(dtype)
    weights, chosen = _routing(512, 16, 4, "cuda")
    x = torch.randn(512, 256, device="cuda", dtype=dtype, requires_grad=True)
    y = experts(x, weights, chosen)
    y.float().square().sum().backward()
    grads = [x.grad, experts.gate_up_proj.grad, experts.down_proj.grad]
    x.grad = experts.gate_up_proj.grad = experts.down_proj.grad = None
    ref = experts.forward_reference(x, weights, chosen)
    ref.float().square().sum().backward()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5  # relative to the norm: bf16 has 8 bits of mantissa
    for got, want in zip([y] + grads, [ref, x.grad, experts.gate_up_proj.grad, experts.down_proj.grad]):
        err = (got.float() - want.float()).norm() / want.float().norm()
        assert err < tol, err
    if dtype == torch.bfloat16:  # the grouped GEMM is the CUDA bf16 path: it must be the one taken
        assert grouped_mm_works("cuda", torch.bfloat16)


def test_autocast_experts_take_the_grouped_gemm(monkeypatch):
    """bf16 autocast over fp32 expert weights (training with train.dtype = auto): the experts run as bf16 grouped
    GEMMs (autocast does not cast _grouped_mm's inputs; the fp32 fallback gathers a weight copy per slot and ran a
    Lite-shaped step out of memory), and match the fp32 loop to bf16 precision, gradients included."""
    from dscoder.model import moe

    cfg = tiny_config(hidden_size=256, moe_intermediate_size=128, n_routed_experts=16, num_experts_per_tok=4)
    torch.manual_seed(0)
    experts = moe.RoutedExperts(cfg).cuda()
    torch.nn.init.normal_(experts.gate_up_proj, std=0.05)
    torch.nn.init.normal_(experts.down_proj, std=0.05)
    weights, chosen = _routing(512, 16, 4, "cuda")
    x = torch.randn(512, 256, device="cuda", requires_grad=True)
    ref = experts.forward_reference(x, weights, chosen)
    ref.square().sum().backward()
    want = [ref, x.grad, experts.gate_up_proj.grad, experts.down_proj.grad]
    x.grad = experts.gate_up_proj.grad = experts.down_proj.grad = None

    def refuse(*args):
        raise AssertionError("the gathered fallback ran under autocast")

    monkeypatch.setattr(moe, "_gathered_mm", refuse)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = experts(x, weights, chosen)
    # (the output is fp32 on CUDA, bf16 on the CPU: CUDA autocast runs the final sum over each token's K experts
    # in fp32)
    y.float().square().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in (x, experts.gate_up_proj, experts.down_proj))
    for got, w in zip([y, x.grad, experts.gate_up_proj.grad, experts.down_proj.grad], want):
        assert ((got.float() - w.float()).norm() / w.float().norm()) < 2e-2


def test_model_on_the_gpu_matches_the_cpu():
    model = dscoder.build_model(tiny_config(), seed=0).eval()
    ids = torch.randint(0, 1024, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cpu = model(ids).logits
        gpu = model.cuda()(ids.cuda()).logits.cpu()
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=1e-4)


def test_bf16_autocast_training_step():
    """train.dtype = auto on CUDA is bf16 autocast over fp32 weights: the loss is the fp32 loss to bf16 precision,
    the weights and their gradients stay fp32 and finite, and the step lowers the loss."""
    from dscoder.train.optim import build_optimizer
    from dscoder.train.run import autocast

    torch.manual_seed(0)
    model = dscoder.build_model(tiny_config(), seed=0, device="cuda").float().train()
    ids = torch.randint(0, 1024, (4, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        fp32 = torch.nn.functional.cross_entropy(model(ids[:, :-1]).logits.float().flatten(0, 1),
                                                 ids[:, 1:].flatten())
    opt = build_optimizer(model, 3e-3, 0.0, (0.9, 0.95))
    losses = []
    for _ in range(5):
        with autocast("auto", "cuda"):
            out = model(ids[:, :-1])
            assert out.logits.dtype == torch.bfloat16
            loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), ids[:, 1:].flatten())
        (loss + out.aux_loss).backward()
        assert all(p.grad is None or (p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all())
                   for p in model.parameters())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert abs(losses[0] - fp32.item()) < 2e-2, (losses[0], fp32.item())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled_decode_matches_eager(dtype):
    """Engine(compile=True) on CUDA: the greedy tokens of eager decoding (batches of 1 and 3)."""
    from dscoder.engine import Engine

    model = dscoder.build_model(tiny_config(), seed=0)
    prompts = [[0, 5, 9, 13, 200, 31], [0, 7, 7, 7], [0, 100, 200, 300, 400, 500, 600, 700]]
    out = {}
    for compiled in (False, True):
        with Engine(model, dtype=dtype, device="cuda", compile=compiled, max_batch_size=4, max_len=256,
                    speculative=False) as engine:
            out[compiled] = ([c.token_ids for c in engine.generate(prompts, max_tokens=40)],
                             engine.generate(prompts[0], max_tokens=40).token_ids)
    if dtype == "float32":
        assert out[True] == out[False]
    else:  # bf16 fusions round differently, and a random model's logits are close to ties: the first tokens agree
        for eager, comp in zip(out[False][0] + [out[False][1]], out[True][0] + [out[True][1]]):
            assert eager[:8] == comp[:8], (out[False], out[True])


_FSDP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    import dscoder
    from dscoder.train.optim import build_optimizer
    from dscoder.train.run import autocast, optimizer_step

    dist.init_process_group("nccl", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{sys.argv[1]}")
    torch.cuda.set_device(0)
    cfg = dscoder.ModelConfig.preset("tiny")
    ids = torch.randint(0, cfg.vocab_size, (4, 65), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    out = {}
    for sharded in (False, True):
        model = dscoder.build_model(cfg, seed=0, device="cuda").float().train()
        if sharded:
            mesh = init_device_mesh("cuda", (1,))
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        opt = build_optimizer(model, 3e-3, 0.1, (0.9, 0.95))
        rows = []
        for step in range(4):
            with autocast(sys.argv[2], "cuda"):
                o = model(ids[:, :-1])
                loss = F.cross_entropy(o.logits.float().flatten(0, 1), ids[:, 1:].flatten())
            (loss + o.aux_loss).backward()
            rows.append([loss.item(), optimizer_step(model, opt, 3e-3, 1.0, step + 1, loss=loss.item())])
        out[str(sharded)] = rows
    print(json.dumps(out))
    dist.destroy_process_group()
""")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fsdp2_over_nccl_matches_the_plain_model(tmp_path, dtype):
    """FSDP2 (fully_shard per layer and at the root) over a 1-GPU NCCL group trains as the plain model does."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "fsdp.py"
    script.write_text(_FSDP_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(port), dtype], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    tol = 1e-4 if dtype == "float32" else 2e-2
    for (l1, g1), (l2, g2) in zip(out["False"], out["True"]):
        assert abs(l1 - l2) <= tol and abs(g1 - g2) <= tol * max(1.0, g1), out


@needs_data_build
def test_pretrain_on_the_gpu_from_the_command_line(stdlib_build, tmp_path):
    """`dscoder train pretrain` on CUDA (bf16 autocast): the loss falls, MFU is against the GPU's bf16 peak, the
    checkpoint resumes and exports."""
    out = tmp_path / "run"
    assert main(["train", "pretrain", "--config", "tiny", "--out", str(out), f"data.path={stdlib_build}",
                             "data.seq_len=128", "train.micro_batch=8", "train.steps=20", "train.warmup_steps=3",
                             "train.ckpt_every=10"]) == 0
    rows = jsonl_rows(out / "metrics.jsonl")
    assert len(rows) == 20 and rows[-1]["loss"] < rows[0]["loss"] - 0.5 and rows[-1]["mfu"] > 0
    meta = json.loads((out / "checkpoints" / "step-000020" / "meta.json").read_text())
    assert meta["peak_flops"].startswith(torch.cuda.get_device_name())
    assert main(["export", str(out), "--out", str(tmp_path / "hf")]) == 0
    assert dscoder.load_model(tmp_path / "hf").config.vocab_size == 512


def test_alignment_recipes_on_the_gpu(tmp_path):
    """SFT and GRPO place the policy, the batches, the reference model and the engine on the GPU (one process)."""
    from conftest import align_recipe
    from dscoder.align.grpo import grpo
    from dscoder.align.sft import sft
    from dscoder.tokenizer import Tokenizer

    words = ["apple", "river", "stone", "cloud"]
    Tokenizer.train([f"User: say {a}\n\nAssistant: {a} {b}" for a in words for b in words] * 3,
                    vocab_size=300).save(tmp_path / "tok")
    rows = [{"messages": [{"role": "user", "content": f"say {a}"}, {"role": "assistant", "content": f"{a} {b}"}]}
            for a in words for b in words]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = sft(align_recipe("sft", f"model.tokenizer={tmp_path / 'tok'}", f"data.path={tmp_path / 'chat.jsonl'}",
                         "data.seq_len=32", "train.steps=20", "train.ckpt_every=20"), tmp_path / "sft")
    assert s["last_loss"] < s["first_loss"] - 0.5, s
    g = grpo(align_recipe("grpo", "train.steps=4", "train.ckpt_every=4"), tmp_path / "grpo")
    assert g["last"]["step"] == 4 and g["last"]["rollout_tokens_per_s"] > 0
    assert (tmp_path / "grpo" / "hf" / "config.json").is_file()


@two_gpus
@needs_data_build
@pytest.mark.parametrize("extra", [[], ["parallel.ep=2"]])
def test_torchrun_fsdp2_on_two_gpus_matches_one(stdlib_build, tmp_path, extra):
    """2 GPUs over NCCL, FSDP2 (and FSDP2 + EP): the losses of one GPU with the same global batch (fp32)."""
    common = [f"data.path={stdlib_build}", "data.seq_len=64", "data.shard=rows", "train.steps=4",
              "train.warmup_steps=2", "train.ckpt_every=4", "train.dtype=float32"]
    assert main(["train", "pretrain", "--config", "tiny", "--out", str(tmp_path / "one"), *common,
                             "train.micro_batch=4"]) == 0
    proc = torchrun("train", "pretrain", "--config", "tiny", "--out", str(tmp_path / "two"), *common,
                    "train.micro_batch=2", "parallel.strategy=fsdp", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (jsonl_rows(tmp_path / name / "metrics.jsonl") for name in ("one", "two"))
    for key in ("loss", "grad_norm"):
        assert max(abs(a[key] - b[key]) for a, b in zip(one, two)) <= 1e-3, (key, one, two)


def test_environment_report():
    """What the GPU suite ran on (printed with -s; the assertion: CUDA really is in use)."""
    props = torch.cuda.get_device_properties(0)
    print(f"\n{props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA "
          f"{torch.version.cuda}, {torch.cuda.device_count()} GPU(s), OMP {os.environ.get('OMP_NUM_THREADS')}")
    assert torch.zeros(1, device="cuda").device.type == "cuda"

"""Step in backward (mlorc_dist.step_in_backward, launch/train.py --step-in-backward): each
parameter stepped as its gradient becomes final computes what optimizer.step() after backward
computes, in one process and under FSDP2; what it cannot do is refused before any step."""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from mlorc_dist import MLorcAdamW, MLorcLion, param_groups, step_in_backward

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "launch" / "train.py")
RUN = ["--model", "tiny", "--seq-len", "32", "--global-batch", "4", "--threads", "1", "--warmup-steps", "2",
       "--clip-grad", "0", "--collective-timeout", "60"]


def tiny_model(dtype=torch.float64, tie=False):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def make(kind, model, fused):
    groups = param_groups(model, weight_decay=0.1)
    if kind == "adamw":
        return MLorcAdamW(groups, lr=1e-2, rank=2, fused=fused)
    return MLorcLion(groups, lr=1e-3, rank=2, fused=fused)


def losses(model, optimizer, batches, in_backward: bool) -> list[float]:
    out = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if in_backward:
            assert all(p.grad is None for p in model.parameters()), "a gradient outlived its step"
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        out.append(float(loss.detach()))
    return out


@pytest.mark.parametrize("kind", ["adamw", "lion"])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("tie", [False, True])
def test_step_in_backward_equals_the_step_after_backward(kind, fused, tie):
    """20 steps in float64 (weight decay, dense embeddings and norms, low-rank bodies; tied
    embeddings stepped once): losses and final weights equal the usual step's."""
    reference = tiny_model(tie=tie)
    model = copy.deepcopy(reference)
    batches = torch.randint(0, 96, (20, 2, 12), generator=torch.Generator().manual_seed(1))
    expected = losses(reference, make(kind, reference, fused), batches, in_backward=False)
    optimizer = make(kind, model, fused)
    handle = step_in_backward(optimizer, model)
    got = losses(model, optimizer, batches, in_backward=True)
    assert got == pytest.approx(expected, rel=1e-12, abs=0)
    for (name, a), b in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14, msg=name)
    assert handle.take_seconds() > 0
    handle.remove()
    assert not handle.handles


def test_a_non_finite_gradient_skips_only_its_parameter():
    model = tiny_model()
    optimizer = make("adamw", model, fused=False)
    step_in_backward(optimizer, model)
    poisoned = model.model.layers[0].mlp.up_proj.weight
    poisoned.register_hook(lambda g: torch.full_like(g, float("nan")))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    with pytest.warns(UserWarning, match="up_proj.*skipped"):
        model(input_ids=ids, labels=ids).loss.backward()
    assert optimizer.skipped_tensors == 1 and optimizer.skipped_steps == 0
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (p is not poisoned), name
    assert not optimizer.state[poisoned] or optimizer.state[poisoned]["step"] == 0
    assert "skipped_tensors" in optimizer.state_dict()["mlorc"]


def test_what_cannot_step_in_backward_is_refused_before_any_step():
    model = tiny_model()
    with pytest.raises(ValueError, match="scope='local'"):
        step_in_backward(MLorcAdamW(param_groups(model), scope="global"), model)
    with pytest.raises(ValueError, match="supports MLorcAdamW and MLorcLion.*AdamW"):
        step_in_backward(torch.optim.AdamW(model.parameters()), model)
    with pytest.raises(ValueError, match="not in the optimizer.*lm_head"):
        step_in_backward(MLorcAdamW([p for n, p in model.named_parameters() if "lm_head" not in n]), model)
    optimizer = MLorcAdamW(param_groups(model))
    ids = torch.randint(0, 96, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(ValueError, match="already hold gradients"):
        step_in_backward(optimizer, model)
    with pytest.raises(ValueError, match="scope='local'"):
        MLorcAdamW(param_groups(model), scope="global").step_tensors(list(model.parameters()))


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT),
                PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")


def _train(prefix: list[str], *args) -> subprocess.CompletedProcess:
    result = subprocess.run([*prefix, TRAIN, *RUN, *args], env=_env(), capture_output=True, text=True,
                            timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _torchrun(port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]


@pytest.mark.parametrize("engine,dtype,port", [("single", "fp32", None), ("fsdp2", "fp32", 29631),
                                               ("fsdp2", "bf16", 29632)])
def test_launch_step_in_backward_trains_and_resumes_like_the_step(tmp_path, engine, dtype, port):
    """launch/train.py, no clipping, 20 steps: --step-in-backward's losses equal the usual step's
    to 1e-6 relative (fp32 weights, and bf16 weights written with stochastic rounding); a run
    stopped at step 10 and resumed equals the uninterrupted one."""
    prefix = [sys.executable] if engine == "single" else _torchrun(port)
    flags = (["--fsdp"] if engine == "fsdp2" else []) + ["--param-dtype", dtype]
    _train(prefix, *flags, "--steps", "20", "--out", str(tmp_path / "step"))
    _train(prefix, *flags, "--steps", "20", "--step-in-backward", "--out", str(tmp_path / "sib"))
    expected, got = _losses(tmp_path / "step"), _losses(tmp_path / "sib")
    assert len(got) == 20 and got == pytest.approx(expected, rel=1e-6, abs=0)
    _train(prefix, *flags, "--steps", "20", "--step-in-backward", "--save-every", "10",
           "--out", str(tmp_path / "resumed"))
    last = sorted((tmp_path / "resumed" / "checkpoints").glob("step_*"))[-1]
    assert last.name.endswith("20")
    shutil.rmtree(last)              # as if stopped after step 10's checkpoint
    _train(prefix, *flags, "--steps", "20", "--step-in-backward", "--resume", "--out", str(tmp_path / "resumed"))
    assert _losses(tmp_path / "resumed") == got


@pytest.mark.parametrize("flags,message", [
    (["--step-in-backward", "--clip-grad", "1"], "pass --clip-grad 0"),
    (["--step-in-backward", "--clip-grad", "0", "--micro-batch", "2"], "accumulates 2 backwards"),
    (["--step-in-backward", "--clip-grad", "0", "--scope", "global"], "--scope local"),
    (["--step-in-backward", "--clip-grad", "0", "--optimizer", "galore"], "mlorc-adamw and mlorc-lion"),
    (["--step-in-backward", "--clip-grad", "0", "--deepspeed", str(ROOT / "ds_configs" / "mlorc.json")],
     "does not work under --deepspeed"),
    (["--param-dtype", "bf16", "--bf16"], "choose one"),
    (["--param-dtype", "bf16", "--optimizer", "adamw"], "stochastic rounding"),
])
def test_refusals_are_one_line_usage_errors(tmp_path, flags, message):
    result = subprocess.run([sys.executable, TRAIN, "--model", "tiny", "--global-batch", "4", "--out",
                             str(tmp_path / "run"), *flags], env=_env(), capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "run").exists()

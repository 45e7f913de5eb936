"""transformers' Trainer and accelerate with MLorc (mlorc_dist.engines.hf), on CPU with gloo.

Four multi-process launches (2 processes each) carry every distributed scenario:
  - tests/dist/hf_worker.py under DeepSpeed ZeRO-2: MLorcTrainer at full rank and at rank 4,
    Trainer's own torch AdamW, an optimizer named in the DeepSpeed config, the optimizers=(opt,
    None) trap, and examples/finetune_trainer.py;
  - the same worker under FSDP2 (Trainer's fsdp=..., fsdp_config={"version": 2});
  - `accelerate launch --config_file examples/accelerate_configs/{deepspeed_zero2,fsdp2}.yaml
    examples/finetune_accelerate.py`.
The tests read what the ranks wrote. Single-process checks come first.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist" / "hf_worker.py"
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
STEPS = 10
ENGINES = ["deepspeed", "fsdp2"]
EMBEDDINGS = ["lm_head.weight", "model.embed_tokens.weight"]


def _load_worker():
    spec = importlib.util.spec_from_file_location("hf_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env(cache: Path) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                DS_ACCELERATOR="cpu", MLORC_CACHE=str(cache), PYTHONPATH=str(ROOT),
                PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")


def _run(cmd: list[str], cache: Path, what: str) -> None:
    result = subprocess.run(cmd, env=_env(cache), capture_output=True, text=True, timeout=600, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One tokenizer cache for every launch of this module (trained once)."""
    return tmp_path_factory.mktemp("mlorc_cache")


@pytest.fixture(scope="module")
def two_d_params():
    model = _load_worker().tiny_llama()
    return sorted(n for n, p in model.named_parameters() if p.dim() == 2)


_RUNS = {"deepspeed": ["mlorc-full", "adamw", "mlorc-r4", "mlorc-block", "trap", "refuse-block", "resume",
                       "example"],
         "fsdp2": ["mlorc-full", "adamw", "mlorc-r4", "example"]}
_WORKER_PORTS = {"deepspeed": 29931, "fsdp2": 29932}
_ACCELERATE_PORTS = {"deepspeed_zero2": 29933, "fsdp2": 29934}


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory, cache):
    """engine -> directory of that engine's worker launch (launched on first use)."""
    done: dict[str, Path] = {}

    def get(engine: str) -> Path:
        if engine not in done:
            out = tmp_path_factory.mktemp(f"hf_{engine}")
            _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                  str(_WORKER_PORTS[engine]), str(WORKER), "--engine", engine, "--out", str(out),
                  "--steps", str(STEPS), "--runs", *_RUNS[engine]], cache, f"Trainer worker ({engine})")
            done[engine] = out
        return done[engine]
    return get


def load(directory: Path, name: str, rank: int | None = None) -> dict:
    path = directory / (f"{name}.pt" if rank is None else f"{name}.rank{rank}.pt")
    return torch.load(path, weights_only=False)


def rel(a: dict, b: dict) -> float:
    num = sum(((a[k] - b[k]) ** 2).sum() for k in b)
    den = sum((b[k] ** 2).sum() for k in b)
    return float((num / den).sqrt())


# --------------------------------------------------------------------------- single process
def test_importing_the_integration_does_not_import_transformers():
    code = ("import sys, mlorc_dist, mlorc_dist.engines.hf; "
            "print(sorted(m for m in ('transformers', 'accelerate', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.fixture
def tiny_model():
    return _load_worker().tiny_llama()


def test_create_optimizer_reads_training_arguments(tmp_path, tiny_model):
    from transformers import TrainingArguments

    import mlorc_dist
    from mlorc_dist.engines import hf

    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-3, adam_beta1=0.8, adam_beta2=0.95,
                             adam_epsilon=1e-7, weight_decay=0.1, report_to=[])
    opt = hf.create_optimizer(tiny_model, args, mlorc={"rank": 3, "seed": 5})
    assert isinstance(opt, mlorc_dist.MLorcAdamW) and opt.seed == 5
    matrices = opt.param_groups[0]
    assert (matrices["lr"], matrices["betas"], matrices["eps"], matrices["weight_decay"], matrices["rank"]) == \
        (3e-3, (0.8, 0.95), 1e-7, 0.1, 3)
    assert {g["lowrank"] for g in opt.param_groups} == {True, False}      # embeddings dense by default
    assert opt.param_groups[-1]["weight_decay"] == 0.0                      # 1-D tensors: no decay
    opt = hf.create_optimizer(tiny_model, args, lr=1e-4, eps=1e-9)
    assert (opt.param_groups[0]["lr"], opt.param_groups[0]["eps"]) == (1e-4, 1e-9)
    lion = hf.create_optimizer(tiny_model, args, optimizer_type="MLorcLion")
    assert isinstance(lion, mlorc_dist.MLorcLion) and lion.param_groups[0]["betas"] == (0.95, 0.98)
    with pytest.raises(ValueError, match="unknown key"):
        hf.create_optimizer(tiny_model, args, mlorc={"rnak": 4})
    with pytest.raises(ValueError, match="MLorcAdamW or MLorcLion"):
        hf.create_optimizer(tiny_model, args, optimizer_type="AdamW")


def test_mlorc_trainer_refuses_a_ready_optimizer(tmp_path, tiny_model):
    """Trainer's DeepSpeed path would silently replace it with AdamW."""
    from transformers import TrainingArguments

    import mlorc_dist
    from mlorc_dist.engines import hf

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    with pytest.raises(ValueError, match="builds its optimizer itself"):
        hf.MLorcTrainer(model=tiny_model, args=args, optimizers=(mlorc_dist.MLorcAdamW(tiny_model.parameters()), None))
    with pytest.raises(ValueError, match="optimizer_cls_and_kwargs"):
        hf.MLorcTrainer(model=tiny_model, args=args, optimizer_cls_and_kwargs=(mlorc_dist.MLorcAdamW, {}))


def test_attach_refuses_an_optimizer_that_is_not_mlorc(tiny_model):
    from mlorc_dist.engines import hf

    with pytest.raises(ValueError, match="wrapping no MLorc optimizer"):
        hf.attach(torch.optim.AdamW(tiny_model.parameters()), tiny_model)


def test_mlorc_trainer_single_process(tmp_path, tiny_model, two_d_params):
    """No engine: the same trainer, the report says 'plain', the counts reach the training log."""
    from mlorc_dist.engines import hf

    worker = _load_worker()
    args = hf.training_arguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3,
                                 learning_rate=1e-3, save_strategy="no", report_to=[], disable_tqdm=True,
                                 logging_steps=1, use_cpu=True)
    before = [p.detach().clone() for p in tiny_model.parameters()]
    trainer = hf.MLorcTrainer(model=tiny_model, args=args, train_dataset=worker.Tokens(6), mlorc={"rank": 4})
    trainer.train()
    report = trainer.mlorc_report
    assert report["engine"] == "plain" and report["world_size"] == 1
    assert report["params_2d"] == len(two_d_params)
    assert report["dense_by_choice"] == EMBEDDINGS and report["dense_2d"] == []
    assert report["lowrank_params"] == len(two_d_params) - 2
    logged = [e for e in trainer.state.log_history if "mlorc_lowrank_params" in e]
    assert logged and logged[0]["mlorc_lowrank_params"] == report["lowrank_params"]
    assert trainer.mlorc_optimizer.state_bytes() > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, tiny_model.parameters()))


# --------------------------------------------------------------------------- Trainer, 2 processes
@pytest.mark.parametrize("engine", ENGINES)
def test_trainer_steps_mlorc_on_every_2d_piece(trainer_runs, engine, two_d_params):
    out = trainer_runs(engine)
    run = load(out, "mlorc-full")
    report = run["report"]
    assert run["optimizer"] == "MLorcAdamW" and run["skipped"] == 0
    assert report["engine"] == {"deepspeed": "zero1/2", "fsdp2": "fsdp2"}[engine]
    assert report["world_size"] == 2
    assert report["params_2d"] == len(two_d_params) == 23
    assert report["lowrank_params"] == report["params_2d"]       # every 2-D parameter, embeddings included
    assert report["lowrank_pieces"] == report["pieces_2d"]       # ... on every piece of it, on every rank
    assert report["dense_by_choice"] == [] and report["dense_2d"] == []
    if engine == "deepspeed":
        assert run["zero"] == "DeepSpeedZeroOptimizer"
        assert report["pieces_2d"] > report["params_2d"]          # ZeRO cut a matrix between the ranks
    else:
        assert report["pieces_2d"] == 2 * report["params_2d"]     # every matrix sharded by rows over both
    # the counts are in the training log, the same as the report
    assert run["logged"][0]["mlorc_lowrank_params"] == report["lowrank_params"]
    assert run["logged"][0]["mlorc_lowrank_pieces"] == report["lowrank_pieces"]
    total = sum(p.numel() for p in run["initial"].values())
    for rank in range(2):
        mine = load(out, "mlorc-full", rank)
        assert mine["report"]["lowrank_params"] == report["lowrank_params"]
        for kind, shape, placement in mine["stepped"]:
            if engine == "deepspeed":     # ZeRO's flat fp32 partitions, each a part of the model
                assert kind == "Tensor" and len(shape) == 1 and shape[0] < total
            else:                         # FSDP2 really sharded: row-sharded DTensors
                assert kind == "DTensor" and placement == "(Shard(dim=0),)"
    # the steps consumed both ranks' slices of the data: one epoch of STEPS x 3 x 2 examples
    assert run["epoch"] == 1.0


@pytest.mark.parametrize("engine", ENGINES)
def test_trainer_full_rank_mlorc_is_trainer_adamw(trainer_runs, engine):
    out = trainer_runs(engine)
    mlorc, adamw = load(out, "mlorc-full"), load(out, "adamw")
    assert adamw["optimizer"] == "AdamW"
    assert [s[0] for s in adamw["stepped"]] == [s[0] for s in mlorc["stepped"]]   # the same engine
    assert rel(adamw["final"], adamw["initial"]) > 1e-2                            # training moved the weights
    # float32 (Trainer under DeepSpeed trains in float32): the gap is each step's rebuild error at
    # second moment entries far below ||V||, where Adam divides by sqrt(v) with eps ~ 0, clamped
    # to the noise floor, not rounding carried and amplified through the steps (see
    # test_distributed.assert_full_rank_is_adamw); measured 1.2e-4 to 1.3e-4 under MKL's default,
    # AVX2 and AVX-512 code paths
    assert rel(mlorc["final"], adamw["final"]) <= 1e-3


@pytest.mark.parametrize("engine", ENGINES)
def test_trainer_rank4_compresses_matrices_and_keeps_embeddings_dense(trainer_runs, engine):
    run = load(trainer_runs(engine), "mlorc-r4")
    report = run["report"]
    assert run["optimizer"] == "MLorcAdamW" and run["settings"]["rank"] == 4
    assert report["dense_by_choice"] == EMBEDDINGS and report["dense_2d"] == []
    assert report["lowrank_params"] == report["params_2d"] - 2
    assert all(math.isfinite(x) for x in run["losses"])
    assert rel(run["final"], run["initial"]) > 1e-2
    adamw = load(trainer_runs(engine), "adamw")
    assert rel(run["final"], adamw["final"]) > 1e-3       # rank 4 is not AdamW: the oracle can fail


def test_deepspeed_config_may_name_mlorc(trainer_runs):
    """"optimizer": {"type": "MLorcAdamW", ...} and an "mlorc" block; "auto" from TrainingArguments."""
    run = load(trainer_runs("deepspeed"), "mlorc-block")
    assert run["optimizer"] == "MLorcAdamW"
    assert run["settings"]["seed"] == 3 and run["settings"]["rank"] == 4
    assert run["settings"]["eps"] == 1e-8 and run["settings"]["lr"] == 1e-3
    assert run["report"]["lowrank_params"] == run["report"]["params_2d"] - 2


def test_deepspeed_config_naming_another_optimizer_is_refused(trainer_runs):
    for rank in range(2):
        error = load(trainer_runs("deepspeed"), "refuse-block", rank)["error"]
        assert error is not None and "'AdamW'" in error


def test_the_optimizers_trap_is_caught(trainer_runs):
    """Plain Trainer + DeepSpeed + optimizers=(MLorc, None): Trainer steps something else;
    hf.attach must say so rather than let it train silently."""
    for rank in range(2):
        seen = load(trainer_runs("deepspeed"), "trap", rank)
        if seen["stepped"] != "MLorcAdamW":
            assert seen["error"] is not None and "wrapping no MLorc optimizer" in seen["error"]


def test_deepspeed_checkpoint_resumes_exactly(trainer_runs):
    """Trainer loads a DeepSpeed checkpoint into the engine before on_train_begin: MLorcTrainer
    attaches the layouts right after the engine is built, so the per-piece state loads."""
    for rank in range(2):
        data = load(trainer_runs("deepspeed"), "resume", rank)
        assert data["global_step"] == 6 and data["report"]["engine"] == "zero1/2"
        assert all(torch.equal(data["straight"][k], data["resumed"][k]) for k in data["straight"])


@pytest.mark.parametrize("engine", ENGINES)
def test_trainer_example_runs(trainer_runs, engine):
    summary = load(trainer_runs(engine), "example", 0)
    report = summary["report"]
    assert summary["optimizer"] == "MLorcAdamW"
    assert report["engine"] == {"deepspeed": "zero1/2", "fsdp2": "fsdp2"}[engine] and report["world_size"] == 2
    assert report["lowrank_params"] == report["params_2d"] - 2 == 14
    assert summary["losses"] and all(math.isfinite(x) for x in summary["losses"])
    assert summary["eval_loss"] < summary["losses"][0]


# --------------------------------------------------------------------------- accelerate launch
@pytest.fixture(scope="module", params=["deepspeed_zero2", "fsdp2"])
def accelerate_run(request, tmp_path_factory, cache):
    name = request.param
    out = tmp_path_factory.mktemp(f"accelerate_{name}")
    config = ROOT / "examples" / "accelerate_configs" / f"{name}.yaml"
    _run([ACCELERATE, "launch", "--config_file", str(config), "--main_process_port",
          str(_ACCELERATE_PORTS[name]), str(ROOT / "examples" / "finetune_accelerate.py"),
          "--steps", "8", "--summary", str(out / "summary.json")], cache, f"accelerate launch ({name})")
    return name, json.loads((out / "summary.json").read_text())


def test_accelerate_launch_runs_the_example(accelerate_run):
    name, summary = accelerate_run
    report = summary["report"]
    assert summary["num_processes"] == 2 and report["world_size"] == 2
    assert summary["optimizer"] == "MLorcAdamW"
    if name == "deepspeed_zero2":
        assert summary["distributed_type"].endswith("DEEPSPEED") and report["engine"] == "zero1/2"
        assert summary["param_types"] == ["Parameter"]
    else:   # FSDP2 really sharded (on CPU accelerate alone would not)
        assert summary["distributed_type"].endswith("FSDP") and report["engine"] == "fsdp2"
        assert summary["param_types"] == ["DTensor(Shard(dim=0),)"]
    assert report["params_2d"] == 16 and report["lowrank_params"] == 14 and report["dense_2d"] == []
    assert report["dense_by_choice"] == EMBEDDINGS
    losses = summary["losses"]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] and summary["eval_loss"] < losses[0]

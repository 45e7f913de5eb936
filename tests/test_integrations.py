"""The tools users already train with: TRL's SFTTrainer and DPOTrainer with MLorc (ZeRO-2/3,
FSDP2), launch/train.py --report-to tensorboard / wandb (offline), MFU in metrics.jsonl,
python -m mlorc_dist.plot, and the memory report's per-node rows.

Launches (CPU, gloo): tests/dist/trl_worker.py under DeepSpeed (SFT ZeRO-2, DPO ZeRO-2, DPO ZeRO-3)
and under FSDP2 (SFT, DPO), 2 processes each; launch/train.py once in one process (TensorBoard
and W&B) and once under torchrun --fsdp with 2 processes (TensorBoard, --profile-memory).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "launch" / "train.py")
TRL_WORKER = str(ROOT / "tests" / "dist" / "trl_worker.py")
TINY = ["--model", "tiny", "--seq-len", "32", "--global-batch", "4", "--threads", "1", "--warmup-steps", "2",
        "--collective-timeout", "120", "--no-final-checkpoint"]
TRL_STEPS = 6
TRL_RUNS = {"deepspeed": ["sft:--deepspeed:2", "dpo:--deepspeed:2", "dpo:--deepspeed:3"],
            "fsdp2": ["sft:--fsdp", "dpo:--fsdp"]}
PORTS = {"deepspeed": 29776, "fsdp2": 29777, "train_fsdp": 29778}


def env(**extra) -> dict:
    values = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu",
                  HF_HUB_DISABLE_TELEMETRY="1", WANDB_MODE="offline", WANDB_SILENT="true", PYTHONPATH=str(ROOT),
                  PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    values.update(extra)
    return values


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One tokenizer and corpus cache for every launch of this module."""
    return tmp_path_factory.mktemp("mlorc_cache")


def run(cmd, what: str, **extra) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=env(**extra), capture_output=True, text=True, timeout=600, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return result


def torchrun(port: int, *args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), *args]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def wandb_history(out: Path) -> list[dict]:
    """The history rows of an offline W&B run, read from its .wandb file (a LevelDB-style log of
    protobuf records: a 7-byte file header, 32 KiB blocks, each record chunk with a 7-byte
    header of CRC, length and type, full / first / middle / last)."""
    from wandb.proto import wandb_internal_pb2 as pb
    [path] = list(out.glob("wandb/offline-run-*/run-*.wandb"))
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, position, chunks, pending = 32768, 7, [], b""
    while position + 7 <= len(data):
        room = block - position % block
        if room < 7:                         # a block's tail too short for a header is padding
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            chunks.append(pending + chunk)
    history = []
    for raw in chunks:
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
    return history


def tiny_flops_per_token(seq: int) -> float:
    """6 N + 12 L d_attn seq for launch/train.py's tiny shape (vocabulary 2048), by hand."""
    from mlorc_dist.models import llama_config
    c = llama_config("tiny", 2048)
    head = c.head_dim
    per_layer = (c.hidden_size * c.num_attention_heads * head * 2                    # q, o
                 + c.hidden_size * c.num_key_value_heads * head * 2                  # k, v
                 + 3 * c.hidden_size * c.intermediate_size)                          # gate, up, down
    n = c.num_hidden_layers * per_layer + c.hidden_size * c.vocab_size              # + lm_head
    return 6.0 * n + 12.0 * c.num_hidden_layers * c.num_attention_heads * head * seq


# --------------------------------------------------------------------------- launch/train.py runs
@pytest.fixture(scope="module")
def reported_run(tmp_path_factory, cache) -> Path:
    """One process, --report-to tensorboard wandb (offline), held-out loss every 3 steps."""
    out = tmp_path_factory.mktemp("reported") / "one"
    run([sys.executable, TRAIN, *TINY, "--steps", "6", "--eval-every", "3", "--eval-batches", "1", "--out", str(out),
         "--report-to", "tensorboard", "wandb"], "launch/train.py --report-to tensorboard wandb",
        MLORC_CACHE=str(cache))
    return out


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, cache) -> Path:
    """torchrun --fsdp, 2 processes, --report-to tensorboard --profile-memory."""
    out = tmp_path_factory.mktemp("reported") / "fsdp"
    run(torchrun(PORTS["train_fsdp"], TRAIN, "--fsdp", *TINY, "--steps", "4", "--eval-every", "2",
                 "--eval-batches", "1", "--out", str(out), "--report-to", "tensorboard", "--profile-memory"),
        "torchrun launch/train.py --fsdp --report-to tensorboard", MLORC_CACHE=str(cache))
    return out


def test_tensorboard_scalars_equal_metrics(reported_run):
    records = metrics(reported_run)
    scalars = tensorboard_scalars(reported_run / "tensorboard")
    assert scalars["train/loss"] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in records]
    # event files hold float32: the same numbers, rounded once
    assert [v for _, v in scalars["train/loss"]] == [float(torch.tensor(r["loss"], dtype=torch.float32))
                                                     for r in records]
    assert [s for s, _ in scalars["eval/loss"]] == [3, 6]
    assert [v for _, v in scalars["eval/loss"]] == [float(torch.tensor(r["eval_loss"], dtype=torch.float32))
                                                    for r in records if "eval_loss" in r]
    for tag, key in (("train/lr", "lr"), ("perf/tokens_per_s", "tokens_per_s"), ("perf/step_time", "step_time"),
                     ("perf/optimizer_time", "optimizer_time"), ("perf/model_flops_per_s", "model_flops_per_s")):
        assert [v for _, v in scalars[tag]] == pytest.approx([r[key] for r in records], rel=1e-6), tag
    assert [v for _, v in scalars["train/skipped_steps"]] == [0.0] * len(records)
    assert len(scalars["memory/peak_rank0_mib"]) == len(records)
    assert all(v > 10 for _, v in scalars["memory/peak_rank0_mib"])       # a process's peak RSS, in MiB


def test_wandb_offline_run_has_the_same_history(reported_run):
    records = metrics(reported_run)
    history = wandb_history(reported_run)
    assert [h["_step"] for h in history] == [r["step"] for r in records]
    assert [h["train/loss"] for h in history] == [r["loss"] for r in records]          # JSON doubles: exact
    assert [h["train/lr"] for h in history] == [r["lr"] for r in records]
    assert [h["eval/loss"] for h in history if "eval/loss" in h] == [r["eval_loss"] for r in records if "eval_loss" in r]
    assert [h["perf/tokens_per_s"] for h in history] == [r["tokens_per_s"] for r in records]
    assert (reported_run / "wandb_run_id").read_text().strip() in str(next(reported_run.glob("wandb/offline-run-*")))


def test_metrics_carry_model_flops(reported_run):
    """On the CPU: the achieved model FLOP/s, no utilisation ratio (no known peak)."""
    for record in metrics(reported_run):
        assert record["model_flops_per_token"] == tiny_flops_per_token(32)
        assert record["model_flops_per_s"] == pytest.approx(record["model_flops_per_token"] * record["tokens_per_s"])
        assert "mfu" not in record


def test_peak_flops_table_and_mfu(monkeypatch):
    from mlorc_dist import flops
    from mlorc_dist.models import llama_config
    monkeypatch.delenv("MLORC_PEAK_TFLOPS", raising=False)
    assert flops.peak_flops("cpu", bf16=True) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, bf16, expected in (("NVIDIA H100 80GB HBM3", True, 989.4e12), ("NVIDIA H100 PCIe", True, 756e12),
                                 ("NVIDIA H200", True, 989.4e12), ("NVIDIA A100-SXM4-80GB", True, 312e12),
                                 ("NVIDIA GeForce RTX 4090", True, 165.2e12), ("Some New GPU", True, None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert flops.peak_flops("cuda:0", bf16=bf16) == expected, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert flops.peak_flops("cuda:0", bf16=False) == 19.5e12                     # fp32 without TF32
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert flops.peak_flops("cuda:0", bf16=False) == 156e12                      # TF32 matmuls
    config = llama_config("tiny", 2048)
    fields = flops.mfu_fields(config, 32, tokens_per_s=1e6, world_size=2, device="cuda:0", bf16=False)
    assert fields["mfu"] == pytest.approx(tiny_flops_per_token(32) * 1e6 / (2 * 156e12))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("MLORC_PEAK_TFLOPS", "100")                               # any device, per device
    assert flops.mfu_fields(config, 32, 1e6, 1, "cpu", False)["mfu"] == pytest.approx(tiny_flops_per_token(32) / 1e8)
    # 7B: 6 N (N without the embedding lookup, with the LM head) + attention, by the published shape
    n7 = 32 * (4 * 4096 ** 2 + 3 * 4096 * 11008) + 4096 * 32000
    assert flops.model_flops_per_token(llama_config("llama-7b", 32000), 4096) == 6 * n7 + 12 * 32 * 4096 * 4096


def test_two_ranks_rank0_reports_every_ranks_memory(fsdp_run):
    records = metrics(fsdp_run)
    assert len(list((fsdp_run / "tensorboard").glob("events.out.tfevents.*"))) == 1       # rank 0 only
    scalars = tensorboard_scalars(fsdp_run / "tensorboard")
    assert [v for _, v in scalars["train/loss"]] == [float(torch.tensor(r["loss"], dtype=torch.float32))
                                                     for r in records]
    peaks = [scalars[f"memory/peak_rank{r}_mib"] for r in (0, 1)]
    assert all(len(p) == len(records) and all(v > 10 for _, v in p) for p in peaks)
    assert [v for _, v in scalars["memory/peak_max_mib"]] == [max(a[1], b[1]) for a, b in zip(*peaks)]
    assert all(r["model_flops_per_token"] == tiny_flops_per_token(32) for r in records)


def test_memory_report_has_per_node_rows(fsdp_run):
    report = json.loads((fsdp_run / "memory.json").read_text())
    [node] = report["nodes"]                                           # torchrun on one machine: one node
    assert node["ranks"] == [0, 1] and node["host"] == report["ranks"][0]["host"]
    assert [r["node_rank"] for r in report["ranks"]] == [0, 0]
    weights = [r["samples"][-1]["tensors"]["weights"] for r in report["ranks"]]
    assert node["sum"]["weights"] == sum(weights) and node["max"]["weights"] == max(weights)
    assert node["sum"]["rss_peak"] == sum(r["peaks"]["rss_peak"] for r in report["ranks"])
    table = (fsdp_run / "memory.txt").read_text().splitlines()
    assert table[1].split()[0] == "0" and table[2].split()[0] == "1"
    assert table[3].startswith("node0 sum") and table[4].startswith("node0 max")
    from PIL import Image
    with Image.open(fsdp_run / "memory.png") as image:
        assert image.size[0] > 400 and image.size[1] > 300


def test_memory_nodes_group_by_host_and_launcher_index(tmp_path, monkeypatch):
    from mlorc_dist.memory import report
    from mlorc_dist.memory.profiler import node_rank

    def rank(r, host, node):
        tensors = {"weights": (r + 1) * 2 ** 20, "grads": 2 ** 20}
        return {"rank": r, "host": host, "node_rank": node, "engine": "zero2", "optimizer": "MLorcAdamW",
                "notes": [], "samples": [{"name": "after_step", "tensors": tensors}],
                "peaks": {"rss_peak": (r + 10) * 2 ** 20, "activations": 2 ** 19}}
    ranks = [rank(0, "a", 0), rank(1, "a", 0), rank(2, "b", 1), rank(3, "b", 1)]
    written = report.write_report(ranks, tmp_path / "memory.json", tmp_path / "memory.png")
    assert [(n["host"], n["ranks"]) for n in written["nodes"]] == [("a", [0, 1]), ("b", [2, 3])]
    assert written["nodes"][1]["sum"]["weights"] == 7 * 2 ** 20 and written["nodes"][1]["max"]["weights"] == 4 * 2 ** 20
    assert written["nodes"][0]["sum"]["activations"] == 2 ** 20
    assert written["nodes"][0]["sum"]["cuda_max_reserved"] is None             # not measured on any rank
    rows = [line.split()[:2] for line in written["table"].splitlines()[5:9]]
    assert rows == [["node0", "sum"], ["node0", "max"], ["node1", "sum"], ["node1", "max"]]
    # one hostname, two launcher nodes (two nodes on loopback): two nodes
    same_host = [rank(0, "a", 0), rank(1, "a", 1)]
    assert [n["ranks"] for n in report.nodes(same_host)] == [[0], [1]]
    for name in ("GROUP_RANK", "CROSS_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert node_rank(5) is None
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert node_rank(5) == 1
    monkeypatch.setenv("GROUP_RANK", "3")
    assert node_rank(5) == 3


def test_plot_overlays_two_runs(reported_run, fsdp_run, tmp_path):
    out = tmp_path / "compare.png"
    result = run([sys.executable, "-m", "mlorc_dist.plot", str(reported_run), str(fsdp_run), "--out", str(out),
                  "--labels", "one process", "fsdp x2"], "python -m mlorc_dist.plot")
    assert result.stdout.strip() == str(out)
    from PIL import Image
    with Image.open(out) as image:
        # five panels (loss, held-out loss, lr, tokens/s, model FLOP/s) on 3 x 2 axes of 5.2 x 3.6 in, 110 dpi
        assert image.size == (1716, 792)
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50        # drawn, not blank
    from mlorc_dist.plot import default_out, read_metrics
    assert default_out([reported_run, fsdp_run]) == Path(os.path.commonpath([reported_run, fsdp_run])) / "compare.png"
    assert default_out([reported_run]) == reported_run / "metrics.png"
    assert [r["step"] for r in read_metrics(fsdp_run)] == [1, 2, 3, 4]
    missing = subprocess.run([sys.executable, "-m", "mlorc_dist.plot", str(tmp_path / "nothing")], env=env(),
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert missing.returncode == 2 and "no metrics.jsonl" in missing.stderr


def test_missing_reporter_package_is_a_usage_error_before_the_model(tmp_path, cache):
    """A wandb that cannot be imported: one line, exit 2, nothing built or written."""
    fake = tmp_path / "site"
    fake.mkdir()
    (fake / "wandb.py").write_text("raise ImportError('No module named wandb')\n")
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, TRAIN, *TINY, "--steps", "2", "--out", str(out), "--report-to", "wandb"],
                            env=env(PYTHONPATH=f"{fake}:{ROOT}", MLORC_CACHE=str(cache)), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "--report-to wandb needs the wandb package" in result.stderr and "pip install" in result.stderr
    assert not (out / "metrics.jsonl").exists()


def test_report_to_checks():
    from mlorc_dist.launch_checks import UsageError
    from mlorc_dist.reporting import check_report_to, scalars_of
    check_report_to(argparse.Namespace(report_to=["none"]))
    check_report_to(argparse.Namespace(report_to=["tensorboard", "wandb"]))
    with pytest.raises(UsageError, match="'none' cannot be combined"):
        check_report_to(argparse.Namespace(report_to=["none", "tensorboard"]))
    with pytest.raises(UsageError, match="unknown"):
        check_report_to(argparse.Namespace(report_to=["mlflow"]))
    scalars = scalars_of({"step": 3, "loss": 2.5, "lr": 1e-3, "eval_loss": 2.0, "mfu": 0.4, "switched": 2,
                          "model_flops_per_token": 1.0, "max_allocated": 2 ** 21}, skipped_steps=1,
                         rank_peaks=[2 ** 20, 3 * 2 ** 20])
    assert scalars == {"train/loss": 2.5, "train/lr": 1e-3, "eval/loss": 2.0, "perf/mfu": 0.4, "train/switched": 2,
                       "memory/max_allocated_rank0_mib": 2.0, "train/skipped_steps": 1,
                       "memory/peak_rank0_mib": 1.0, "memory/peak_rank1_mib": 3.0, "memory/peak_max_mib": 3.0}


# --------------------------------------------------------------------------- TRL
@pytest.fixture(scope="module")
def trl_runs(tmp_path_factory, cache):
    """engine -> (directory, log) of that engine's tests/dist/trl_worker.py launch."""
    done: dict[str, tuple[Path, str]] = {}

    def get(engine: str) -> tuple[Path, str]:
        if engine not in done:
            out = tmp_path_factory.mktemp(f"trl_{engine}")
            result = run(torchrun(PORTS[engine], TRL_WORKER, "--out", str(out), "--steps", str(TRL_STEPS),
                                  "--runs", *TRL_RUNS[engine]), f"TRL worker ({engine})",
                         MLORC_CACHE=str(cache))
            done[engine] = (out, result.stdout + result.stderr)
        return done[engine]
    return get


TRL_CASES = [("deepspeed", "sft-deepspeed2", "zero1/2"), ("deepspeed", "dpo-deepspeed2", "zero1/2"),
             ("deepspeed", "dpo-deepspeed3", "zero3"), ("fsdp2", "sft-fsdp", "fsdp2"), ("fsdp2", "dpo-fsdp", "fsdp2")]


@pytest.mark.parametrize("engine,name,kind", TRL_CASES, ids=[c[1] for c in TRL_CASES])
def test_trl_trainer_steps_mlorc(trl_runs, engine, name, kind):
    out, log = trl_runs(engine)
    trainer = "MLorcSFTTrainer" if name.startswith("sft") else "MLorcDPOTrainer"
    for rank in range(2):
        data = json.loads((out / f"{name}.rank{rank}.json").read_text())
        summary, report = data["summary"], data["summary"]["report"]
        assert summary["trainer"] == trainer and summary["step_count"] == TRL_STEPS
        # what stepped is MLorc-AdamW, built by the trainer, and nothing else (no silent AdamW)
        assert summary["optimizer"] == "MLorcAdamW" and summary["stepped_is_built"]
        assert set(data["stepped"]) == {"MLorcAdamW"}
        assert data["stepped"]["MLorcAdamW"] % TRL_STEPS == 0 and data["stepped"]["MLorcAdamW"] >= TRL_STEPS
        assert summary["zero"] == {"zero1/2": "DeepSpeedZeroOptimizer", "zero3": "DeepSpeedZeroOptimizer_Stage3",
                                   "fsdp2": None}[kind]
        assert report["engine"] == kind and report["world_size"] == 2
        assert report["params_2d"] == 16 and report["lowrank_params"] == 14 and report["dense_2d"] == []
        assert report["dense_by_choice"] == ["lm_head.weight", "model.embed_tokens.weight"]
        if kind != "zero1/2":
            assert report["pieces_2d"] == 32 and report["lowrank_pieces"] == 28       # every matrix row-sharded
        assert summary["logged"][0]["mlorc_lowrank_params"] == 14                     # in the training log
        assert summary["losses"] and all(math.isfinite(x) for x in summary["losses"])
        assert summary["skipped_steps"] == 0
    summary = json.loads((out / f"{name}.rank0.json").read_text())["summary"]
    if trainer == "MLorcSFTTrainer":
        assert summary["eval_loss"] < summary["losses"][0]
    else:
        assert summary["eval_loss"] < math.log(2)          # DPO starts at log 2 (policy = reference)
    # the log shows the treatment counts over all ranks and per rank
    assert f"MLorc-AdamW under {kind}, world size 2: low-rank momentum on 14 of 16 2-D parameters" in log
    assert (f"MLorc-AdamW (scope=local, fused step (fused=None: the default for these devices and scope)) "
            f"under {kind}, this rank's pieces") in log
    assert f"({trainer}): low-rank momentum on 14 of 16 2-D parameters" in log


def test_trl_trainers_refuse_a_ready_optimizer(tmp_path):
    import mlorc_dist
    from mlorc_dist.engines import hf
    from trl import DPOTrainer, SFTTrainer
    from transformers import Trainer

    assert issubclass(hf.MLorcSFTTrainer, SFTTrainer) and issubclass(hf.MLorcDPOTrainer, DPOTrainer)
    assert hf.MLorcSFTTrainer.__mro__[1] is hf.MLorcTrainerMixin
    assert hf.trainer_class(Trainer) is hf.MLorcTrainer and hf.trainer_class(SFTTrainer) is hf.MLorcSFTTrainer
    model = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="MLorcSFTTrainer builds its optimizer itself"):
        hf.MLorcSFTTrainer(model=model, optimizers=(mlorc_dist.MLorcAdamW(model.parameters()), None))
    with pytest.raises(ValueError, match="optimizer_cls_and_kwargs"):
        hf.MLorcDPOTrainer(model=model, optimizer_cls_and_kwargs=(mlorc_dist.MLorcAdamW, {}))
    with pytest.raises(ValueError, match="MLorcAdamW or MLorcLion, or a peer"):
        hf.create_optimizer(model, optimizer_type="SwitchLoRAAdamW")


@pytest.mark.parametrize("flags,algorithm,lowrank", [(["--optimizer", "MoFaSGD", "--lr", "0.02"], "MoFaSGD", 14),
                                                     (["--lora"], "MLorc-AdamW", 0)],
                         ids=["mofasgd", "lora"])
def test_trl_example_runs_the_peers_in_one_process(tmp_path, cache, flags, algorithm, lowrank):
    """A peer optimizer; LoRA through TRL's peft_config with dense AdamW on the adapters."""
    summary_path = tmp_path / "summary.json"
    run([sys.executable, str(ROOT / "examples" / "sft_trl.py"), *flags, "--steps", "3", "--output-dir",
         str(tmp_path / "run"), "--summary", str(summary_path)], f"examples/sft_trl.py {' '.join(flags)}",
        MLORC_CACHE=str(cache))
    summary = json.loads(summary_path.read_text())
    report = summary["report"]
    assert report["algorithm"] == algorithm and report["engine"] == "plain" and summary["step_count"] == 3
    assert report["lowrank_params"] == lowrank
    if "--lora" in flags:     # only the adapters train: 7 adapted linears x 2 layers x (A, B)
        assert report["params_2d"] == 28 and all(".lora_" in name for name in report["dense_by_choice"])
    assert all(math.isfinite(x) for x in summary["losses"])

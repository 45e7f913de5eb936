"""launch/train.py end to end: DeepSpeed and torchrun/FSDP2 launches, two nodes on loopback,
kill -9 and exact resume, resharding, SFT, export, dry run, and bad input."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "launch" / "train.py")
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")   # the launcher of the environment running the tests
TINY = ["--model", "tiny", "--seq-len", "32", "--global-batch", "4", "--threads", "1", "--warmup-steps", "2"]


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu",
                PYTHONPATH=str(ROOT), PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")


def torchrun(n, port, *args, nnodes=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n)]
    cmd += ["--master_port", str(port)] if nnodes is None else []
    return cmd + [TRAIN, *args]


def run(cmd, timeout=600):
    result = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return result


def ok(cmd):
    result = run(cmd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(path)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def test_deepspeed_launcher_trains_and_checkpoints(tmp_path):
    out = tmp_path / "ds"
    ok([DEEPSPEED, "--num_accelerators", "2", "--master_port", "29801", TRAIN,
        "--deepspeed", str(ROOT / "ds_configs" / "mlorc.json"), *TINY, "--steps", "6",
        "--save-every", "3", "--profile-memory", "--out", str(out)])
    lines = metrics(out)
    assert [m["step"] for m in lines] == list(range(1, 7))
    assert all(m["loss"] == m["loss"] for m in lines) and lines[-1]["loss"] < lines[0]["loss"]
    meta = json.loads((out / "checkpoints" / "step_00000006" / "meta.json").read_text())
    assert meta["engine"] == "deepspeed" and meta["world_size"] == 2 and meta["algorithm"] == "MLorc-AdamW"
    report = json.loads((out / "memory.json").read_text())          # --profile-memory
    assert [r["rank"] for r in report["ranks"]] == [0, 1] and report["engine"] == "zero2"
    assert all(r["peaks"]["state_factors"] > 0 for r in report["ranks"])
    assert (out / "memory.png").stat().st_size > 0


@pytest.mark.parametrize("config", ["mlorc_zero1.json", "mlorc_zero3.json"])
def test_deepspeed_zero1_and_zero3_configs_run(tmp_path, config):
    out = tmp_path / "ds"
    ok([DEEPSPEED, "--num_accelerators", "2", "--master_port", "29802", TRAIN,
        "--deepspeed", str(ROOT / "ds_configs" / config), *TINY, "--steps", "3", "--out", str(out)])
    assert len(metrics(out)) == 3


def test_kill_9_then_resume_reproduces_the_uninterrupted_run_bitwise(tmp_path):
    common = ["--fsdp", *TINY, "--seq-len", "64", "--global-batch", "8", "--steps", "20",
              "--save-every", "4", "--scope", "local"]
    straight = tmp_path / "straight"
    ok(torchrun(2, 29803, *common, "--out", str(straight)))
    killed = tmp_path / "killed"
    job = subprocess.Popen(torchrun(2, 29804, *common, "--out", str(killed)), env=env(), cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step_00000004" / "meta.json").exists():
        assert job.poll() is None and time.time() < deadline, "job ended before its first checkpoint"
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    steps_before_kill = len(metrics(killed))
    assert steps_before_kill < 20, "the kill came after the end; nothing was resumed"
    result = ok(torchrun(2, 29805, *common, "--out", str(killed), "--resume"))
    assert "resumed from" in result.stderr + result.stdout
    assert [m["loss"] for m in metrics(killed)] == [m["loss"] for m in metrics(straight)]


def test_global_scope_checkpoint_reshards_from_2_to_1_and_3_ranks(tmp_path):
    common = ["--fsdp", *TINY, "--global-batch", "6", "--steps", "8", "--scope", "global"]
    straight = tmp_path / "ws2"
    ok(torchrun(2, 29806, *common, "--save-every", "4", "--out", str(straight)))
    reference = metrics(straight)
    for world, port in ((1, 29807), (3, 29808)):
        out = tmp_path / f"ws{world}"
        (out / "checkpoints").mkdir(parents=True)
        os.system(f"cp -r {straight}/checkpoints/step_00000004 {out}/checkpoints/")
        result = ok(torchrun(world, port, *common, "--out", str(out), "--resume"))
        assert "'global rows': 14" in result.stderr + result.stdout
        resumed = metrics(out)
        assert [m["step"] for m in resumed] == [5, 6, 7, 8]
        # the next step equals the uninterrupted world-size-2 run to rounding
        assert abs(resumed[0]["loss"] - reference[4]["loss"]) <= 1e-5 * abs(reference[4]["loss"])
        for a, b in zip(resumed, reference[4:]):
            assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(b["loss"])


def test_local_scope_checkpoint_loads_at_another_world_size_by_recompressing(tmp_path):
    common = ["--fsdp", *TINY, "--global-batch", "6", "--steps", "6", "--scope", "local"]
    first = tmp_path / "ws2"
    ok(torchrun(2, 29809, *common, "--save-every", "3", "--out", str(first)))
    out = tmp_path / "ws1"
    (out / "checkpoints").mkdir(parents=True)
    os.system(f"cp -r {first}/checkpoints/step_00000003 {out}/checkpoints/")
    result = ok(torchrun(1, 29810, *common, "--out", str(out), "--resume"))
    assert "'recompressed': 14" in result.stderr + result.stdout
    resumed, reference = metrics(out), metrics(first)
    assert abs(resumed[0]["loss"] - reference[3]["loss"]) <= 1e-2 * reference[3]["loss"]


def test_two_nodes_one_process_each_on_loopback(tmp_path):
    out = tmp_path / "nodes"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:29811", "--rdzv_id", "mlorc-test",
           TRAIN, "--fsdp", *TINY, "--steps", "4", "--out", str(out)]
    nodes = [subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(log[-3000:] for log in logs)
    assert "fsdp2 x2" in "".join(logs)
    assert len(metrics(out)) == 4


def test_sft_masks_the_prompt_and_exports_a_loadable_model(tmp_path):
    data = tmp_path / "sft.jsonl"
    records = [{"prompt": f"Question {i}: what is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(40)]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    from mlorc_dist.data import default_corpus_path, train_tokenizer
    from mlorc_dist.training import IGNORE_INDEX, load_sft_records
    tokenizer = train_tokenizer([str(default_corpus_path())], 2048, tmp_path / "tok")
    inputs, labels = load_sft_records(data, tokenizer, "prompt", "response", 32)
    prompt_len = len(tokenizer(records[0]["prompt"], add_special_tokens=False)["input_ids"])
    assert (labels[0, :prompt_len] == IGNORE_INDEX).all() and (labels[0, prompt_len] != IGNORE_INDEX)
    out = tmp_path / "sft"
    ok([sys.executable, TRAIN, "--task", "sft", "--data", str(data), *TINY, "--steps", "4",
        "--eval-every", "2", "--export", "--out", str(out)])
    assert "eval_loss" in metrics(out)[1]
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(out / "export", local_files_only=True)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_dry_run_builds_llama_7b_on_meta_without_gpus():
    result = ok([sys.executable, TRAIN, "--deepspeed", str(ROOT / "ds_configs" / "mlorc.json"),
                 "--model", "llama-7b", "--world-size", "64", "--global-batch", "512", "--dry-run"])
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert abs(summary["parameters"] - 6.74e9) < 0.05e9
    assert summary["world_size"] == 64 and summary["gradient_accumulation"] == 1
    bad = run([sys.executable, TRAIN, "--fsdp", "--model", "tiny", "--world-size", "3", "--global-batch", "8", "--dry-run"])
    assert bad.returncode != 0 and "not a multiple" in bad.stderr


def test_bad_input_gives_clear_errors_and_overwrites_nothing(tmp_path):
    missing = run([sys.executable, TRAIN, *TINY, "--data", str(tmp_path / "nope.txt"), "--steps", "1",
                   "--out", str(tmp_path / "x")])
    assert missing.returncode != 0 and "data file not found" in missing.stderr

    config = json.loads((ROOT / "ds_configs" / "mlorc.json").read_text())
    config["mlorc"]["rnak"] = 4
    (tmp_path / "typo.json").write_text(json.dumps(config))
    typo = run([sys.executable, TRAIN, "--deepspeed", str(tmp_path / "typo.json"), *TINY, "--steps", "1"])
    assert typo.returncode != 0 and "unknown key(s) in the 'mlorc' block: ['rnak']" in typo.stderr

    config = json.loads((ROOT / "ds_configs" / "mlorc.json").read_text())
    config["optimizer"]["type"] = "MLorcSGD"
    (tmp_path / "sgd.json").write_text(json.dumps(config))
    sgd = run([sys.executable, TRAIN, "--deepspeed", str(tmp_path / "sgd.json"), *TINY, "--steps", "1"])
    assert sgd.returncode != 0 and "MLorcSGD" in sgd.stderr

    out = tmp_path / "run"
    ok([sys.executable, TRAIN, *TINY, "--steps", "2", "--save-every", "2", "--out", str(out)])
    before = tree_digest(out / "checkpoints")
    other = run([sys.executable, TRAIN, "--model", "demo", "--seq-len", "32", "--global-batch", "4",
                 "--threads", "1", "--warmup-steps", "2", "--steps", "2", "--save-every", "2", "--resume",
                 "--out", str(out)])
    assert other.returncode != 0 and "checkpoint of another model" in other.stderr
    assert tree_digest(out / "checkpoints") == before
    fresh = run([sys.executable, TRAIN, *TINY, "--steps", "2", "--save-every", "2", "--out", str(out)])
    assert fresh.returncode != 0 and "already holds a run" in fresh.stderr   # no --resume: refuse
    assert tree_digest(out / "checkpoints") == before


def test_run_train_sh_runs_deepspeed_under_torchrun_and_scripts_parse(tmp_path):
    """launch/run_train.sh (the engine the SLURM scripts use: one torchrun agent per node)."""
    result = subprocess.run(["bash", str(ROOT / "launch" / "run_train.sh"), *TINY, "--steps", "2",
                             "--out", str(tmp_path / "rt")],
                            env=dict(env(), ENGINE="deepspeed", NPROC="2", PYTHON=sys.executable,
                                     MASTER_PORT="29812"),
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(metrics(tmp_path / "rt")) == 2
    for script in ("slurm_torchrun.sbatch", "slurm_deepspeed.sbatch", "run_train.sh"):
        assert subprocess.run(["bash", "-n", str(ROOT / "launch" / script)]).returncode == 0


@pytest.mark.parametrize("config,world,exact", [("mlorc.json", 2, True), ("mlorc_zero3.json", 1, False)])
def test_deepspeed_checkpoint_resumes(tmp_path, config, world, exact):
    """ZeRO-2 at the same world size: bitwise; ZeRO-3 global scope written at 2 ranks, resumed
    at 1: to rounding (master weights go back into DeepSpeed's partitions and compute copies)."""
    straight = tmp_path / "straight"
    ok([DEEPSPEED, "--num_accelerators", "2", "--master_port", "29813", TRAIN,
        "--deepspeed", str(ROOT / "ds_configs" / config), *TINY, "--steps", "6", "--save-every", "3",
        "--out", str(straight)])
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    os.system(f"cp -r {straight}/checkpoints/step_00000003 {out}/checkpoints/")
    ok([DEEPSPEED, "--num_accelerators", str(world), "--master_port", "29814", TRAIN,
        "--deepspeed", str(ROOT / "ds_configs" / config), *TINY, "--steps", "6", "--out", str(out), "--resume"])
    resumed, reference = metrics(out), metrics(straight)[3:]
    assert [m["step"] for m in resumed] == [4, 5, 6]
    if exact:
        assert [m["loss"] for m in resumed] == [m["loss"] for m in reference]
    else:
        for a, b in zip(resumed, reference):
            assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(b["loss"])


def test_mofasgd_deepspeed_resumes_bitwise_and_fsdp2_refuses_another_world_size(tmp_path):
    """MoFaSGD's factors are checkpointed per piece: ZeRO-2 at the same world size resumes
    bitwise. FSDP2 cuts every matrix by rows, so at another world size no piece matches and the
    checkpoint is refused (MoFaSGD does not reshard factors; dense pieces would load)."""
    config = str(ROOT / "ds_configs" / "mofasgd.json")
    straight = tmp_path / "straight"
    ok([DEEPSPEED, "--num_accelerators", "2", "--master_port", "29815", TRAIN, "--deepspeed", config,
        *TINY, "--steps", "6", "--save-every", "3", "--out", str(straight)])
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    os.system(f"cp -r {straight}/checkpoints/step_00000003 {out}/checkpoints/")
    ok([DEEPSPEED, "--num_accelerators", "2", "--master_port", "29816", TRAIN, "--deepspeed", config,
        *TINY, "--steps", "6", "--out", str(out), "--resume"])
    assert [m["loss"] for m in metrics(out)] == [m["loss"] for m in metrics(straight)[3:]]
    fsdp = tmp_path / "fsdp"
    common = [*TINY, "--fsdp", "--optimizer", "mofasgd", "--lr", "0.02", "--dense-lr", "1e-3",
              "--steps", "4", "--save-every", "2", "--out", str(fsdp)]
    ok(torchrun(2, 29817, *common))
    result = run(torchrun(1, 29820, *common, "--resume"))
    assert result.returncode != 0 and "resume only at the layout" in result.stdout + result.stderr


@pytest.mark.parametrize("method,extra", [("lora", ["--lr", "2e-3"]),
                                          ("galore", ["--rank", "8", "--galore-interval", "2"])])
def test_fsdp2_trains_the_peer_methods(tmp_path, method, extra):
    out = tmp_path / method
    result = ok(torchrun(2, 29818, *TINY, "--fsdp", "--optimizer", method, *extra, "--steps", "8",
                         "--out", str(out)))
    log = result.stdout + result.stderr       # one summary naming the method in use
    assert log.count({"lora": "fsdp2 x2: LoRA (peft) rank 4", "galore": "fsdp2 x2: GaLore-AdamW rank 8"}[method]) == 1
    assert "MLorc-AdamW" not in log
    losses = [m["loss"] for m in metrics(out)]
    assert len(losses) == 8 and all(l == l for l in losses)
    assert sum(losses[-3:]) / 3 < losses[0]


def test_deepspeed_lora_config_trains_only_the_adapters(tmp_path):
    out = tmp_path / "lora"
    result = ok([DEEPSPEED, "--num_accelerators", "2", "--master_port", "29819", TRAIN, "--deepspeed",
                 str(ROOT / "ds_configs" / "lora.json"), *TINY, "--steps", "4", "--out", str(out)])
    log = result.stdout + result.stderr
    # 14 adapted layers, A and B each: 28 adapter tensors, summed over both ranks' partitions
    assert log.count("deepspeed x2: LoRA (peft) rank 8") == 1 and "dense (group lowrank=False): 28 params" in log
    assert len(metrics(out)) == 4


def test_switchlora_deepspeed_zero2_resumes_bitwise(tmp_path):
    """SwitchLoRA under ZeRO-2 (the switch writes A, B into the flat partitions); a checkpoint
    carries the folded W, the pools and the per-vector optimizer state: resume is bitwise."""
    config = json.loads((ROOT / "ds_configs" / "switchlora.json").read_text())
    config["adapter"]["rank"] = 8                 # the tiny Llama's k/v projections are 64 x 32
    path = tmp_path / "switchlora.json"
    path.write_text(json.dumps(config))
    straight = tmp_path / "straight"
    common = ["--deepspeed", str(path), *TINY, "--steps", "40"]
    ok([DEEPSPEED, "--num_accelerators", "2", "--master_port", "29821", TRAIN, *common,
        "--save-every", "4", "--out", str(straight)])
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    os.system(f"cp -r {straight}/checkpoints/step_00000004 {out}/checkpoints/")
    ok([DEEPSPEED, "--num_accelerators", "2", "--master_port", "29822", TRAIN, *common, "--out", str(out),
        "--resume"])
    records = metrics(straight)
    assert sum(m["switched_rows_A"] + m["switched_cols_B"] for m in records[:4]) > 0
    assert sum(m["switched_rows_A"] + m["switched_cols_B"] for m in records[4:]) > 0   # after the resume
    key = lambda m: (m["step"], m["loss"], m["switched_rows_A"], m["switched_cols_B"])  # noqa: E731
    assert [key(m) for m in metrics(out)] == [key(m) for m in records[4:]]
    assert sum(m["loss"] for m in records[-3:]) / 3 < records[0]["loss"]

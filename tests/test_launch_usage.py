"""launch/train.py as a user meets it: evaluation that never hangs, a collective timeout that
names the rank, DeepSpeed config precedence, one-line usage errors, resume with a recorded lr
schedule, quiet logs."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlorc_dist.launch_checks import UsageError, resolve_deepspeed_config
from mlorc_dist.schedule import Schedule, lr_at

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "launch" / "train.py")
EVAL_WORKER = str(ROOT / "tests" / "dist" / "eval_worker.py")
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
TINY = ["--model", "tiny", "--seq-len", "32", "--global-batch", "4", "--threads", "1", "--warmup-steps", "2"]
TIMEOUT = ["--collective-timeout", "60"]      # a regression ends in an error, not a hung suite


def env():
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu",
                PYTHONPATH=str(ROOT), PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")


def run(cmd, timeout=600):
    return subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def ok(cmd):
    result = run(cmd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def torchrun(n, port, script, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", str(port),
            script, *args]


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- evaluation
EVAL_ARGS = ["--model", "tiny", "--seq-len", "16", "--global-batch", "6", "--micro-batch", "1", "--export", *TIMEOUT]


@pytest.fixture(scope="module")
def one_process_eval(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval1")
    ok([sys.executable, EVAL_WORKER, str(folder / "r.json"), "6", *EVAL_ARGS, "--optimizer", "adamw",
        "--out", str(folder / "run")])
    return json.loads((folder / "r.json").read_text())["eval"]


@pytest.mark.parametrize("engine,world,port", [("fsdp2", 2, 29601), ("fsdp2", 3, 29602),
                                               ("zero3", 2, 29603), ("zero3", 3, 29604)])
def test_evaluation_meets_on_every_rank_at_any_held_out_size(tmp_path, one_process_eval, engine, world, port):
    """Held-out sets of 1 .. 2 x micro x world examples (most leave some rank without a real
    example): every evaluation completes and equals one process's; the step after it and the
    export after that work (FSDP2's root stays gathered after a forward without backward)."""
    largest = str(2 * world)
    if engine == "fsdp2":
        cmd = torchrun(world, port, EVAL_WORKER, str(tmp_path / "r.json"), largest, "--fsdp", "--optimizer", "adamw",
                       *EVAL_ARGS, "--out", str(tmp_path / "run"))
    else:
        cmd = [DEEPSPEED, "--num_accelerators", str(world), "--master_port", str(port), EVAL_WORKER,
               str(tmp_path / "r.json"), largest, "--deepspeed", str(ROOT / "ds_configs" / "mlorc_zero3.json"),
               *EVAL_ARGS, "--out", str(tmp_path / "run")]
    ok(cmd)
    result = json.loads((tmp_path / "r.json").read_text())["eval"]
    for size in range(1, 2 * world + 1):
        assert abs(result[str(size)] - one_process_eval[str(size)]) <= 1e-5 * one_process_eval[str(size)], size
    assert result["after_step"] == result["after_step"]          # finite: the step after evaluation ran
    if engine == "fsdp2":     # AdamW at any world size: the same step to rounding
        assert abs(result["after_step"] - one_process_eval["after_step"]) <= 1e-4 * one_process_eval["after_step"]
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "export", local_files_only=True)
    assert model.config.use_cache is True


def test_initial_weights_are_the_same_at_every_world_size(tmp_path):
    """One process, FSDP2 at 1, 2 and 3 ranks (parameters built on the meta device, each rank
    filling only its rows) and ZeRO-3 at 2 ranks: bitwise the same initial model."""
    flags = ["--model", "tiny", "--seq-len", "16", "--global-batch", "6", "--micro-batch", "1", "--export", *TIMEOUT]
    runs = {"single": [sys.executable, EVAL_WORKER, str(tmp_path / "r.json"), "0", *flags]}
    for world in (1, 2, 3):
        runs[f"fsdp2x{world}"] = torchrun(world, 29610 + world, EVAL_WORKER, str(tmp_path / "r.json"), "0", "--fsdp",
                                          *flags)
    runs["zero3x2"] = [DEEPSPEED, "--num_accelerators", "2", "--master_port", "29614", EVAL_WORKER,
                       str(tmp_path / "r.json"), "0", "--deepspeed", str(ROOT / "ds_configs" / "mlorc_zero3.json"), *flags]
    digests = {}
    for name, cmd in runs.items():
        ok(cmd + ["--out", str(tmp_path / name)])
        digests[name] = (tmp_path / name / "export" / "model.safetensors").read_bytes()
    assert all(d == digests["single"] for d in digests.values()), [n for n, d in digests.items() if d != digests["single"]]


def test_fsdp2_evaluating_at_the_last_step_then_exporting(tmp_path):
    """The reported case: 400 lines of text, eval every 3 of 6 steps (the held-out set's last
    chunk leaves rank 1 empty), --export after an evaluation; the logs are one summary, no
    deprecation warning of ours."""
    small = tmp_path / "small.txt"
    from mlorc_dist.data import default_corpus_path
    small.write_text("".join(default_corpus_path().read_text().splitlines(keepends=True)[:400]))
    out = tmp_path / "run"
    result = ok(torchrun(2, 29605, TRAIN, "--fsdp", *TINY, "--data", str(small), "--steps", "6",
                         "--eval-every", "3", "--export", "--out", str(out), *TIMEOUT))
    lines = metrics(out)
    assert [m["step"] for m in lines] == list(range(1, 7)) and "eval_loss" in lines[2] and "eval_loss" in lines[5]
    assert (out / "export" / "config.json").is_file()
    assert (out / "checkpoints" / "step_00000006" / "meta.json").is_file()     # the final checkpoint
    log = result.stdout + result.stderr
    assert "torch_dtype" not in log
    assert log.count("fsdp2 x2: MLorc-AdamW rank 4, local scope") == 1
    assert log.count("low-rank (local body): 14 params") == 1


def test_a_stuck_rank_ends_in_an_error_naming_the_other_rank(tmp_path):
    """Rank 1 stops (SIGSTOP) mid-run: rank 0's next collective fails after --collective-timeout
    with a line naming rank 0, instead of waiting forever."""
    out = tmp_path / "run"
    job = subprocess.Popen(torchrun(2, 29606, TRAIN, "--fsdp", *TINY, "--steps", "100000", "--out", str(out),
                                    "--collective-timeout", "5", "--no-final-checkpoint"),
                           env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    try:
        deadline = time.time() + 300
        while not ((out / "metrics.jsonl").is_file() and len(metrics(out)) >= 2):
            assert job.poll() is None and time.time() < deadline, "the run ended before its second step"
            time.sleep(0.1)
        rank1 = [pid for pid in _descendants(job.pid) if _environ(pid).get("RANK") == "1"]
        assert len(rank1) == 1
        os.kill(rank1[0], signal.SIGSTOP)
        started = time.time()
        log = ""
        for line in job.stdout:
            log += line
            if "did not complete" in line:
                break
        assert "launch/train.py: error: rank 0: a collective did not complete within 5 s" in log, log[-3000:]
        assert time.time() - started < 120
    finally:
        ranks = _descendants(job.pid)     # the launcher may run its ranks in sessions of their own
        os.killpg(job.pid, signal.SIGKILL)
        for pid in ranks:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        job.wait()


def _descendants(pid: int) -> list[int]:
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(c) for c in children] + [d for c in children for d in _descendants(int(c))]


def _environ(pid: int) -> dict:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


# --------------------------------------------------------------------------- usage errors
def _typo_config(tmp_path):
    config = json.loads((ROOT / "ds_configs" / "mlorc.json").read_text())
    config["mlorc"]["rnak"] = 4
    (tmp_path / "typo.json").write_text(json.dumps(config))
    return str(tmp_path / "typo.json")


@pytest.mark.parametrize("flags,message", [
    (["--optimizer", "nonsense"], "--optimizer 'nonsense' does not exist"),
    (["--rank", "0"], "--rank must be >= 1, got 0"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--data", "missing.txt"], "data file not found"),
    (["--deepspeed", "TYPO"], "unknown key(s) in the 'mlorc' block: ['rnak']"),
    (["--deepspeed", "ds_configs/mlorc.json", "--optimizer", "galore"],
     "--optimizer galore is given with --deepspeed ds_configs/mlorc.json, whose optimizer.type is MLorcAdamW"),
    (["--deepspeed", "ds_configs/mlorc.json", "--rank", "64"], "whose mlorc.rank is 4"),
    (["--deepspeed", "ds_configs/mlorc.json", "--lr", "0.5"],
     "--lr 0.5 disagrees with ds_configs/mlorc.json's \"optimizer.params.lr\": 0.0001"),
    (["--extend-schedule"], "--extend-schedule continues a checkpoint: it needs --resume"),
    (["--task", "sft"], "--task sft needs --data"),
])
def test_usage_errors_are_one_line_before_anything_is_built(tmp_path, flags, message):
    flags = [_typo_config(tmp_path) if f == "TYPO" else f for f in flags]
    out = tmp_path / "out"
    result = run([sys.executable, TRAIN, *TINY, *flags, "--out", str(out)], timeout=120)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("launch/train.py: error: ") and message in lines[0], result.stderr
    assert not out.exists()                 # nothing was built or written
    debug = run([sys.executable, TRAIN, *TINY, *flags, "--out", str(out), "--debug"], timeout=120)
    assert "Traceback" in debug.stderr and debug.returncode != 0


def test_a_usage_error_under_torchrun_is_printed_once(tmp_path):
    result = run(torchrun(2, 29607, TRAIN, "--fsdp", *TINY, "--rank", "0", "--out", str(tmp_path / "o")), timeout=300)
    assert result.returncode != 0
    assert (result.stdout + result.stderr).count("launch/train.py: error: --rank must be >= 1") == 1


def test_help_shows_every_default():
    text = run([sys.executable, TRAIN, "--help"], timeout=120).stdout
    for default in ("(default: mlorc-adamw)", "(default: 4)", "(default: 100)", "(default: 0.001)", "(default: runs/train)"):
        assert default in text


def _args(**overrides):
    base = dict(micro_batch=None, global_batch=8, clip_grad=1.0, lr=1e-3, weight_decay=0.0, betas=None, bf16=False,
                save_every=0, no_final_checkpoint=False, seed=0, init_from=None, model="tiny")
    return argparse.Namespace(**{**base, **overrides})


def test_deepspeed_config_precedence():
    shipped = json.loads((ROOT / "ds_configs" / "mlorc.json").read_text())
    # "auto": the command line (or its default) decides
    args = _args(global_batch=16)
    config = resolve_deepspeed_config(json.loads(json.dumps(shipped)), args, {"global_batch"}, 2, "mlorc.json")
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"], config["train_batch_size"],
            config["gradient_clipping"]) == (8, 1, 16, 1.0)
    # a number in the JSON and nothing on the command line: the JSON's, into args too
    fixed = dict(shipped, train_micro_batch_size_per_gpu=2, gradient_clipping=0.5)
    args = _args()
    config = resolve_deepspeed_config(json.loads(json.dumps(fixed)), args, set(), 2, "fixed.json")
    assert (args.micro_batch, args.clip_grad, args.lr, config["gradient_accumulation_steps"]) == (2, 0.5, 1e-4, 2)
    # set in both: must agree
    resolve_deepspeed_config(json.loads(json.dumps(fixed)), _args(micro_batch=2), {"micro_batch"}, 2, "fixed.json")
    with pytest.raises(UsageError, match=r"--micro-batch 4 disagrees with fixed.json's \"train_micro_batch_size_per_gpu\": 2"):
        resolve_deepspeed_config(json.loads(json.dumps(fixed)), _args(micro_batch=4), {"micro_batch"}, 2, "fixed.json")
    with pytest.raises(UsageError, match="gradient_accumulation_steps\": 3 disagrees"):
        resolve_deepspeed_config(dict(shipped, gradient_accumulation_steps=3), _args(), set(), 2, "x.json")
    with pytest.raises(UsageError, match="--clip-grad 0.0 disagrees"):
        resolve_deepspeed_config(json.loads(json.dumps(fixed)), _args(clip_grad=0.0), {"clip_grad"}, 2, "fixed.json")
    # DeepSpeed's own optimizer cannot be checkpointed by launch/train.py: refused unless no checkpoint is asked for
    own = dict(shipped, optimizer={"type": "AdamW", "params": {"lr": 1e-4}})
    own.pop("mlorc")
    with pytest.raises(UsageError, match="--no-final-checkpoint"):
        resolve_deepspeed_config(json.loads(json.dumps(own)), _args(), set(), 2, "own.json")
    resolve_deepspeed_config(json.loads(json.dumps(own)), _args(no_final_checkpoint=True), set(), 2, "own.json")
    # what launch/train.py does not fill may not stay "auto"; a scheduler would be overridden every step
    bucket = dict(shipped, zero_optimization={"stage": 3, "round_robin_gradients": "auto"})
    with pytest.raises(UsageError, match=r"\['zero_optimization.round_robin_gradients'\] are \"auto\""):
        resolve_deepspeed_config(json.loads(json.dumps(bucket)), _args(), set(), 2, "bucket.json")
    with pytest.raises(UsageError, match="remove the JSON's \"scheduler\" block"):
        resolve_deepspeed_config(dict(shipped, scheduler={"type": "WarmupLR"}), _args(), set(), 2, "s.json")
    with pytest.raises(UsageError, match="\"train_micro_batch_size_per_gpu\" must be an integer >= 1, got 0"):
        resolve_deepspeed_config(dict(shipped, train_micro_batch_size_per_gpu=0), _args(), set(), 2, "zero.json")
    with pytest.raises(UsageError, match="--seed 3 disagrees"):       # the sketches' seed is the JSON's
        resolve_deepspeed_config(json.loads(json.dumps(shipped)), _args(seed=3), {"seed"}, 2, "mlorc.json")


def test_zero_buckets_written_auto_follow_the_model_and_given_ones_stay(tmp_path):
    """transformers' rules: reduce / all-gather buckets hidden^2, ZeRO-3 prefetch 0.9 hidden^2,
    persistence threshold 10 hidden; ZeRO-3's live and reuse limits 24 hidden^2 (two decoder
    layers); from the model the flags name (shape, config.json, --init-from)."""
    from mlorc_dist.models import llama_config
    shipped = json.loads((ROOT / "ds_configs" / "mlorc_zero3.json").read_text())
    assert shipped["zero_optimization"]["reduce_bucket_size"] == "auto"
    hidden = llama_config("100m", 2).hidden_size
    config = resolve_deepspeed_config(json.loads(json.dumps(shipped)), _args(model="100m"), set(), 2, "z3.json")
    zero = config["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"], zero["stage3_param_persistence_threshold"]) \
        == (hidden ** 2, int(0.9 * hidden ** 2), 0)       # the shipped threshold (0) is a number: it stays
    assert zero["stage3_max_live_parameters"] == zero["stage3_max_reuse_distance"] == zero["sub_group_size"] \
        == 24 * hidden ** 2
    llama_config("tiny", 2).save_pretrained(tmp_path / "m")
    mine = dict(shipped, zero_optimization={"stage": 2, "reduce_bucket_size": 12345, "allgather_bucket_size": "auto"})
    zero = resolve_deepspeed_config(mine, _args(model=str(tmp_path / "m" / "config.json")), set(), 2,
                                    "z2.json")["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["allgather_bucket_size"]) == (12345, llama_config("tiny", 2).hidden_size ** 2)
    auto = dict(shipped, zero_optimization={"stage": 3, "stage3_param_persistence_threshold": "auto"})
    zero = resolve_deepspeed_config(auto, _args(init_from=str(tmp_path / "m")), set(), 2, "x.json")["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == 10 * llama_config("tiny", 2).hidden_size


def test_dry_run_reports_the_json_micro_batch(tmp_path):
    config = json.loads((ROOT / "ds_configs" / "mlorc.json").read_text())
    config["train_micro_batch_size_per_gpu"] = 4
    (tmp_path / "m4.json").write_text(json.dumps(config))
    result = ok([sys.executable, TRAIN, "--deepspeed", str(tmp_path / "m4.json"), "--model", "llama-7b",
                 "--world-size", "64", "--global-batch", "512", "--dry-run"])
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert (summary["micro_batch"], summary["gradient_accumulation"]) == (4, 2)
    assert "GB" in summary["plan"]["per_gpu_peak"]



def test_dry_run_plans_with_the_zero_sizes_the_run_uses():
    """The shipped ZeRO-3 config writes its sizes "auto": the dry run resolves them from the hidden
    size and the plan it prints uses them, not DeepSpeed's defaults."""
    from mlorc_dist.memory import planner
    from mlorc_dist.models import LLAMA2_VOCAB_SIZE, llama_config
    result = ok([sys.executable, TRAIN, "--deepspeed", str(ROOT / "ds_configs" / "mlorc_zero3.json"),
                 "--model", "llama-7b", "--world-size", "8", "--global-batch", "8", "--seq-len", "512", "--dry-run"])
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    zero = summary["deepspeed_config"]["zero_optimization"]
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 4096 ** 2)
    kwargs = dict(engine="zero3", world_size=8, optimizer="mlorc-adamw", rank=4, micro_batch=1, seq=512,
                  scope=summary["mlorc"].get("scope", "local"))
    config = llama_config("llama-7b", LLAMA2_VOCAB_SIZE)
    sized = planner.plan_for_run(config, zero=zero, **kwargs)
    default = planner.plan_for_run(config, **kwargs)
    assert summary["plan"]["per_gpu_peak"] == planner.peak_line(sized) != planner.peak_line(default)
    gathered = "gathered params (one layer + prefetch bucket)"
    layer = 4 * 4096 ** 2 + 3 * 4096 * 11008 + 2 * 4096
    assert sized.transients[gathered] == (layer + zero["stage3_prefetch_bucket_size"]) * 4
    assert default.transients[gathered] == (layer + 50_000_000) * 4

# --------------------------------------------------------------------------- resume and the schedule
def test_schedule_extension_is_continuous_and_round_trips():
    base = Schedule(peak=1e-3, warmup=2, total=10, min_ratio=0.1)
    assert [base.lr(s) for s in range(1, 11)] == [lr_at(s, peak=1e-3, warmup=2, total=10, min_ratio=0.1)
                                                  for s in range(1, 11)]
    longer = base.extend(at=5, total=20)
    assert [longer.lr(s) for s in range(1, 6)] == [base.lr(s) for s in range(1, 6)]
    steps = [longer.lr(s) for s in range(5, 21)]
    assert all(a >= b for a, b in zip(steps, steps[1:])) and abs(steps[-1] - 1e-4) < 1e-15
    assert base.lr(5) - longer.lr(6) < base.lr(5) - base.lr(6)        # a gentler decay, no jump
    warming = base.extend(at=1, total=20)                             # still warming up: the same warmup
    assert max(warming.lr(s) for s in range(1, 21)) == 1e-3 and warming.lr(1) == base.lr(1)
    again = longer.extend(at=20, total=30)                            # a finished run stays at its floor
    assert abs(again.lr(25) - 1e-4) < 1e-15
    assert Schedule.from_state(json.loads(json.dumps(again.state_dict()))) == again


def test_resume_keeps_the_schedule_and_writes_each_step_once(tmp_path):
    out = tmp_path / "run"
    ok([sys.executable, TRAIN, *TINY, "--steps", "8", "--save-every", "4", "--out", str(out)])
    first = metrics(out)
    # nothing left to do: said, and nothing changes
    same = ok([sys.executable, TRAIN, *TINY, "--steps", "8", "--resume", "--out", str(out)])
    assert "nothing left to do" in same.stderr and metrics(out) == first
    bare = ok([sys.executable, TRAIN, "--model", "tiny", "--seq-len", "32", "--global-batch", "4", "--resume",
               "--out", str(out)])                                    # the schedule's flags come from the checkpoint
    assert "nothing left to do: the checkpoint at step 8 reaches --steps 8" in bare.stderr and metrics(out) == first
    changed = run([sys.executable, TRAIN, *TINY, "--lr", "0.5", "--resume", "--out", str(out)])
    assert changed.returncode == 2 and "was written with lr 0.001, and --lr is 0.5" in changed.stderr
    # another --steps: refused, one line, nothing written
    longer = run([sys.executable, TRAIN, *TINY, "--steps", "16", "--resume", "--out", str(out)])
    assert longer.returncode == 2 and "--extend-schedule" in longer.stderr and len(longer.stderr.splitlines()) == 1
    assert metrics(out) == first
    # from the step-4 checkpoint with --extend-schedule: the lr continues from step 4's
    extended = tmp_path / "extended"
    (extended / "checkpoints").mkdir(parents=True)
    os.system(f"cp -r {out}/checkpoints/step_00000004 {extended}/checkpoints/")
    (extended / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in first))   # a run killed after step 8
    ok([sys.executable, TRAIN, *TINY, "--steps", "16", "--resume", "--extend-schedule", "--out", str(extended)])
    lines = metrics(extended)
    assert [m["step"] for m in lines] == list(range(1, 17))         # steps 5-8 once, written again
    assert lines[:4] == first[:4] and lines[4]["loss"] == first[4]["loss"]   # the same step 5 data and weights
    lrs = [m["lr"] for m in lines]
    assert lrs[4] < lrs[3] and lrs[3] - lrs[4] < first[3]["lr"] - first[4]["lr"]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and abs(lrs[-1] - 0.1 * 1e-3) < 1e-12
    assert (extended / "checkpoints" / "step_00000016").is_dir()      # the final checkpoint
    meta = json.loads((extended / "checkpoints" / "step_00000016" / "meta.json").read_text())
    assert meta["schedule"]["extensions"] == [[4, 16]]
    # no final checkpoint when asked
    none = tmp_path / "none"
    ok([sys.executable, TRAIN, *TINY, "--steps", "2", "--no-final-checkpoint", "--out", str(none)])
    assert not (none / "checkpoints").exists()


def test_sft_trains_its_tokenizer_on_the_records(tmp_path):
    """With --task sft and no tokenizer, the locally trained tokenizer learns from the prompts and
    responses (a word only they use becomes one token), not from the demo corpus."""
    data = tmp_path / "sft.jsonl"
    records = [{"prompt": f"Question {i}: who is Quokkafrabble?", "response": f"Quokkafrabble is friend {i}."}
               for i in range(200)]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "sft"
    ok([sys.executable, TRAIN, "--task", "sft", "--data", str(data), *TINY, "--steps", "2", "--eval-every", "2",
        "--export", "--out", str(out)])
    from transformers import AutoTokenizer
    from mlorc_dist.data import default_corpus_path, train_tokenizer
    learned = AutoTokenizer.from_pretrained(out / "export", local_files_only=True)
    demo = train_tokenizer([str(default_corpus_path())], 2048, tmp_path / "tok")
    word = " Quokkafrabble"
    assert len(learned(word, add_special_tokens=False)["input_ids"]) == 1
    assert len(demo(word, add_special_tokens=False)["input_ids"]) > 1


def test_a_truncated_checkpoint_file_is_named_and_nothing_is_overwritten(tmp_path):
    out = tmp_path / "run"
    ok([sys.executable, TRAIN, *TINY, "--steps", "2", "--out", str(out)])
    shard = out / "checkpoints" / "step_00000002" / "rank0.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result = run([sys.executable, TRAIN, *TINY, "--steps", "2", "--resume", "--out", str(out)])
    assert result.returncode == 2 and f"{shard}: not a readable checkpoint file, truncated or corrupt" in result.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

"""Token shards (mlorc_dist.corpus): the ids of the in-memory path, byte-identical shards at any
worker count, SFT masks, world-size-independent batches and exact resume from memory-mapped
shards, clear errors, atomic preparation, and launch/train.py on a prepared directory."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mlorc_dist import corpus
from mlorc_dist.data import load_token_ids, split_train_eval, contiguous_windows, train_tokenizer
from mlorc_dist.training import (GlobalBatches, load_pretraining_ids, load_sft_records, packed_source,
                                 sft_source)

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "launch" / "train.py")
VOCAB_SIZE = 300
# Lines the in-memory path splits in its own way: \r\n and \r (universal newlines), a form
# feed and U+2028 (not line breaks for datasets' text reader), a blank line, no final newline.
SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog.\n"
    "Optimizers keep state: AdamW keeps two moments per parameter, MLorc compresses them.\r\n"
    "\n"
    "Unicode survives byte-level BPE: naïve café, 数据, emoji 🙂.\rform\x0cfeed and\u2028separator\n"
) * 40 + "no final newline"
RECORDS = [{"text": f"Record {i}: the value is {i * i}. " + "Repeat. " * (i % 5), "n": i} for i in range(60)]
RECORDS[3]["text"] = ""          # an empty record is still a document (one eos)
SFT_RECORDS = [{"prompt": f"Question {i}: what is {i} plus {i}? " + "Think. " * (i % 4),
                "response": f"It is {2 * i}." + " Indeed." * (i % 3)} for i in range(50)]


def env(cache: Path) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), MLORC_CACHE=str(cache))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    text = root / "sample.txt"
    text.write_bytes(SAMPLE_TEXT.encode("utf-8"))        # bytes: keep the \r\n as written
    jsonl = root / "records.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    parquet = root / "records.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(RECORDS), parquet, row_group_size=7)
    sft = root / "sft.jsonl"
    sft.write_text("".join(json.dumps(r) + "\n" for r in SFT_RECORDS))
    tokenizer = train_tokenizer([str(text)], vocab_size=VOCAB_SIZE, cache_dir=root / "tok-cache")
    tokenizer_dir = root / "tokenizer"
    tokenizer.save_pretrained(str(tokenizer_dir))
    return {"root": root, "txt": text, "jsonl": jsonl, "parquet": parquet, "sft": sft,
            "tokenizer": tokenizer, "tokenizer_dir": tokenizer_dir}


def all_ids(directory: Path) -> torch.Tensor:
    shards = corpus.TokenShards(directory)
    return torch.from_numpy(shards.read(0, len(shards)))


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.bin"))}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name)


# --------------------------------------------------------------------------- the ids
def test_text_file_gives_the_in_memory_ids_and_workers_write_identical_shards(files, tmp_path):
    tokenizer = files["tokenizer"]
    expected = load_token_ids(files["txt"], tokenizer, cache_dir=tmp_path / "cache")
    one = corpus.prepare(files["txt"], tokenizer, tmp_path / "w1", workers=1, shard_tokens=997, chunk_chars=500)
    two = corpus.prepare(files["txt"], tokenizer, tmp_path / "w2", workers=2, shard_tokens=997, chunk_chars=500)
    assert torch.equal(all_ids(one), expected)
    assert shard_bytes(one) == shard_bytes(two) and len(shard_bytes(one)) > 3
    index = json.loads((one / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["num_tokens"] == expected.numel() and index["num_documents"] == 1
    assert index["source"]["files"][0]["bytes"] == files["txt"].stat().st_size
    assert corpus.TokenShards(one).document(0) == (0, expected.numel())
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_records_give_the_in_memory_ids(files, tmp_path, kind):
    tokenizer = files["tokenizer"]
    expected = load_pretraining_ids(files[kind], tokenizer)
    out = corpus.prepare(files[kind], tokenizer, tmp_path / kind, workers=2, shard_tokens=500, chunk_chars=300)
    assert torch.equal(all_ids(out), expected)
    shards = corpus.TokenShards(out)
    assert shards.num_documents == len(RECORDS)
    ends = [shards.document(i)[1] for i in range(len(RECORDS))]
    assert all(int(expected[e - 1]) == tokenizer.eos_token_id for e in ends)
    assert shards.document(3)[1] - shards.document(3)[0] == 1       # the empty record: its eos


def test_a_directory_or_glob_is_its_files_in_sorted_order(files, tmp_path):
    tokenizer = files["tokenizer"]
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "b.txt").write_bytes(files["txt"].read_bytes())
    (data / "a.jsonl").write_bytes(files["jsonl"].read_bytes())
    (data / "sub" / "c.md").write_text("A markdown file.\nTwo lines.\n")
    (data / "empty.txt").write_text("")                                 # no tokens: no document
    (data / ".hidden.txt").write_text("never read")
    expected = torch.cat([load_pretraining_ids(data / "a.jsonl", tokenizer),
                          load_token_ids(data / "b.txt", tokenizer, cache_dir=tmp_path / "cache"),
                          load_token_ids(data / "sub" / "c.md", tokenizer, cache_dir=tmp_path / "cache")])
    from_dir = corpus.prepare(data, tokenizer, tmp_path / "dir", workers=2)
    from_glob = corpus.prepare(str(data / "**" / "*.*"), tokenizer, tmp_path / "glob", workers=1)
    assert torch.equal(all_ids(from_dir), expected)
    assert shard_bytes(from_dir) == shard_bytes(from_glob)
    assert corpus.TokenShards(from_dir).num_documents == len(RECORDS) + 2


def test_uint32_shards_for_large_vocabularies(files, tmp_path, monkeypatch):
    assert corpus.token_dtype_name(65536) == "uint16" and corpus.token_dtype_name(65537) == "uint32"
    monkeypatch.setattr(corpus, "token_dtype_name", lambda vocab: "uint32")
    out = corpus.prepare(files["jsonl"], files["tokenizer"], tmp_path / "u32", workers=1)
    assert json.loads((out / "index.json").read_text())["dtype"] == "uint32"
    assert torch.equal(all_ids(out), load_pretraining_ids(files["jsonl"], files["tokenizer"]))


@pytest.mark.parametrize("seq_len", [32, 96])   # 32 cuts most records, 96 none
def test_sft_records_keep_their_prompt_mask(files, tmp_path, seq_len):
    tokenizer = files["tokenizer"]
    out = corpus.prepare(files["sft"], tokenizer, tmp_path / "sft", fields=corpus.Fields("sft"), workers=2,
                         shard_tokens=256, chunk_chars=200)
    shards = corpus.TokenShards(out, tokenizer=tokenizer, task="sft")
    inputs, labels = corpus.sft_rows(shards, range(len(SFT_RECORDS)), seq_len, tokenizer.pad_token_id)
    expected_inputs, expected_labels = load_sft_records(files["sft"], tokenizer, "prompt", "response", seq_len)
    assert torch.equal(inputs, expected_inputs) and torch.equal(labels, expected_labels)
    prompt = len(tokenizer(SFT_RECORDS[0]["prompt"], add_special_tokens=False)["input_ids"])
    assert int(shards.prompt_lengths[0]) == prompt


# --------------------------------------------------------------------------- batches
def test_batches_from_shards_are_the_in_memory_batches_at_world_size_1_and_2(files, tmp_path):
    tokenizer = files["tokenizer"]
    shards = corpus.TokenShards(corpus.prepare(files["txt"], tokenizer, tmp_path / "s", workers=2, shard_tokens=333))
    seq_len, global_batch = 16, 8
    train_ids, eval_ids = split_train_eval(load_token_ids(files["txt"], tokenizer, cache_dir=tmp_path / "cache"))
    source = corpus.packed_source(shards, seq_len)
    whole = GlobalBatches(source, global_batch, 4, 1, 0, seed=3)
    ranks = [GlobalBatches(source, global_batch, 2, 2, r, seed=3) for r in range(2)]
    in_memory = GlobalBatches(packed_source(train_ids, seq_len), global_batch, 4, 1, 0, seed=3)
    for _ in range(5):
        reference = torch.cat([ids for ids, _ in in_memory.next_step()])
        assert torch.equal(torch.cat([ids for ids, _ in whole.next_step()]), reference)
        per_rank = [rank.next_step() for rank in ranks]
        # micro-step j of rank r holds global rows [(j * world + r) * micro, + micro)
        interleaved = torch.cat([per_rank[r][j][0] for j in range(2) for r in range(2)])
        assert torch.equal(interleaved, reference)
    windows = corpus.eval_windows(shards, seq_len, 1000)
    assert torch.equal(windows, contiguous_windows(eval_ids, seq_len))
    assert torch.equal(corpus.eval_windows(shards, seq_len, 3), windows[:3])


def test_sft_batches_are_the_in_memory_batches(files, tmp_path):
    tokenizer = files["tokenizer"]
    out = corpus.prepare(files["sft"], tokenizer, tmp_path / "sft", fields=corpus.Fields("sft"), workers=1)
    shards = corpus.TokenShards(out, task="sft")
    draw, (eval_inputs, eval_labels) = corpus.sft_sources(shards, 40, tokenizer.pad_token_id, eval_count=100)
    inputs, labels = load_sft_records(files["sft"], tokenizer, "prompt", "response", 40)
    held = max(1, inputs.shape[0] // 20)
    assert torch.equal(eval_inputs, inputs[:held]) and torch.equal(eval_labels, labels[:held])
    ours = GlobalBatches(draw, 4, 2, 2, 1, seed=0)
    theirs = GlobalBatches(sft_source(inputs[held:], labels[held:]), 4, 2, 2, 1, seed=0)
    for _ in range(3):
        for (a, b), (c, d) in zip(ours.next_step(), theirs.next_step()):
            assert torch.equal(a, c) and torch.equal(b, d)


def test_resume_continues_at_the_same_token(files, tmp_path):
    shards = corpus.TokenShards(corpus.prepare(files["txt"], files["tokenizer"], tmp_path / "s", workers=1))
    source = corpus.packed_source(shards, 16)
    run = GlobalBatches(source, 4, 2, 2, 0, seed=7)
    run.next_step()
    saved = run.state_dict()
    continued = [run.next_step() for _ in range(3)]
    reopened = corpus.TokenShards(tmp_path / "s")               # a new process opens the shards again
    resumed = GlobalBatches(corpus.packed_source(reopened, 16), 4, 2, 2, 0, seed=123)
    resumed.load_state_dict(saved)
    for expected in continued:
        for (a, _), (b, _) in zip(expected, resumed.next_step()):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------- errors
@pytest.fixture
def prepared(files, tmp_path):
    return corpus.prepare(files["jsonl"], files["tokenizer"], tmp_path / "prepared", workers=1, shard_tokens=400)


def test_another_tokenizer_is_refused_naming_the_index(files, prepared, tmp_path):
    other = train_tokenizer([str(files["txt"])], vocab_size=VOCAB_SIZE + 20, cache_dir=tmp_path / "other")
    with pytest.raises(ValueError, match=r"index\.json: prepared with another tokenizer"):
        corpus.TokenShards(prepared, tokenizer=other)
    corpus.TokenShards(prepared, tokenizer=corpus.load_hf_tokenizer(files["tokenizer_dir"]))   # same hash


def test_a_truncated_shard_is_refused_naming_it(prepared):
    shard = prepared / "tokens-00001.bin"
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size - 2)
    with pytest.raises(ValueError, match=r"tokens-00001\.bin is truncated"):
        corpus.TokenShards(prepared)


def test_a_missing_index_or_directory_is_refused(prepared, tmp_path):
    (prepared / "index.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"index\.json is missing"):
        corpus.TokenShards(prepared)
    with pytest.raises(FileNotFoundError, match="not found"):
        corpus.TokenShards(tmp_path / "nowhere")


def test_the_wrong_task_is_refused(prepared):
    with pytest.raises(ValueError, match="prepared for --task pretrain"):
        corpus.TokenShards(prepared, task="sft")


def test_an_empty_corpus_is_refused_and_leaves_nothing(files, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"empty corpus: .*empty\.txt"):
        corpus.prepare(tmp_path / "empty.txt", files["tokenizer"], tmp_path / "out", workers=1)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_failed_prepare_leaves_no_directory(files, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_bytes(files["jsonl"].read_bytes() * 400)     # answers in flight at the error
    (data / "b.jsonl").write_text('{"text": "fine"}\n{"text": null}\n')
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"b\.jsonl: record 1 has no 'text' text"):
        corpus.prepare(data, files["tokenizer"], tmp_path / "out", workers=2)
    assert time.monotonic() - started < 25          # workers blocked on unread answers are killed, not awaited
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    with pytest.raises(ValueError, match=r"lack field\(s\) \['body'\]"):
        corpus.prepare(data, files["tokenizer"], tmp_path / "out", fields=corpus.Fields(text="body"), workers=1)


def test_an_existing_output_is_not_overwritten(files, prepared):
    before = shard_bytes(prepared)
    with pytest.raises(FileExistsError, match="already exists"):
        corpus.prepare(files["txt"], files["tokenizer"], prepared, workers=1)
    assert shard_bytes(prepared) == before


def test_a_killed_prepare_leaves_no_valid_directory(files, tmp_path):
    big = tmp_path / "big.txt"
    big.write_bytes(files["txt"].read_bytes() * 200)                 # seconds of work
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mlorc_dist.data", "prepare", "--data", str(big), "--tokenizer",
           str(files["tokenizer_dir"]), "--out", str(out), "--workers", "2"]
    proc = subprocess.Popen(cmd, env=env(tmp_path / "cache"), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.tmp-*/tokens-00000.bin")) and time.monotonic() < deadline:
        assert proc.poll() is None, "prepare ended before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)                               # the workers too
    proc.wait()
    assert not out.exists()
    assert leftovers(tmp_path) and not (tmp_path / leftovers(tmp_path)[0] / "index.json").exists()


# --------------------------------------------------------------------------- processes
def test_command_line_prepare_and_info(files, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "part1.jsonl").write_bytes(files["jsonl"].read_bytes())
    (data / "part2.parquet").write_bytes(files["parquet"].read_bytes())
    out = tmp_path / "shards"
    result = subprocess.run([sys.executable, "-m", "mlorc_dist.data", "prepare", "--data", str(data),
                             "--tokenizer", str(files["tokenizer_dir"]), "--out", str(out), "--workers", "2"],
                            env=env(tmp_path / "cache"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    expected = torch.cat([load_pretraining_ids(files["jsonl"], files["tokenizer"]),
                          load_pretraining_ids(files["parquet"], files["tokenizer"])])
    assert summary["num_tokens"] == expected.numel() and torch.equal(all_ids(out), expected)
    info = subprocess.run([sys.executable, "-m", "mlorc_dist.data", "info", str(out)], env=env(tmp_path / "cache"),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert info.returncode == 0 and json.loads(info.stdout)["num_documents"] == 2 * len(RECORDS)


def test_fsdp2_two_ranks_train_from_a_prepared_directory(files, tmp_path):
    """Two torchrun launches at world size 2: --data FILE (rank 0 prepares it into the cache
    while rank 1 waits) and --data DIR (prepared by the command line) see the same batches."""
    data = tmp_path / "corpus.txt"
    data.write_bytes(files["txt"].read_bytes() * 3)
    prepared = tmp_path / "prepared"
    cache = tmp_path / "cache"
    subprocess.run([sys.executable, "-m", "mlorc_dist.data", "prepare", "--data", str(data), "--tokenizer",
                    str(files["tokenizer_dir"]), "--out", str(prepared)], env=env(cache), cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    common = ["--fsdp", "--model", "tiny", "--seq-len", "32", "--global-batch", "4", "--threads", "1",
              "--steps", "3", "--warmup-steps", "1", "--eval-every", "3", "--vocab-size", str(VOCAB_SIZE)]
    losses = []
    for port, source in ((29700, ["--data", str(data), "--tokenizer", str(files["tokenizer_dir"])]),
                         (29701, ["--data", str(prepared)])):
        out = tmp_path / f"run{port}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               TRAIN, *common, *source, "--out", str(out)]
        result = subprocess.run(cmd, env=env(cache), cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
        losses.append([(m["loss"], m.get("eval_loss")) for m in map(json.loads, (out / "metrics.jsonl").open())])
    assert losses[0] == losses[1] and len(losses[0]) == 3 and losses[0][-1][1] is not None
    cached = list((cache / "corpora").iterdir())
    assert len(cached) == 1 and shard_bytes(cached[0]) == shard_bytes(prepared)

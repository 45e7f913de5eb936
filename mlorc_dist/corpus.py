"""Token shards: a corpus tokenised once, in parallel, into memory-mapped files, and the
training batches read from them.

Preparing (``python -m mlorc_dist.data prepare`` or :func:`prepare`) streams the records of
text, JSON lines / JSON or parquet files with ``datasets`` (never the whole corpus in memory),
tokenises them in worker processes, and writes, in a directory:

* ``tokens-00000.bin``, ``tokens-00001.bin``, ...: the token ids of the whole corpus,
  concatenated, little-endian uint16 (vocabularies up to 65536) or uint32, ``shard_tokens``
  ids per shard (the last one shorter);
* ``documents.bin``: int64, the end offset of every document in the concatenation;
* ``prompt_lengths.bin`` (``task == "sft"``): int32, the prompt's token count per record;
* ``tokenizer/``: the tokenizer that made the ids (``save_pretrained``);
* ``index.json``: dtype, token and document counts, shard sizes, the tokenizer's hash, the
  source files' sizes and SHA-256 digests.

The ids are those of the in-memory path (mlorc_dist.data.load_token_ids,
mlorc_dist.training.load_pretraining_ids / load_sft_records) for the same text: a text file is
one document whose lines are tokenised one by one, then one eos; a record of a JSON / parquet
file is one document, its text then eos; an SFT record is prompt + response + eos, the prompt
masked from the loss.

Shard and worker counts change nothing a reader sees: every offset is global (over the
concatenation), training windows are drawn as global offsets and may cross shard and document
boundaries (packing, as the in-memory path), and the eval split is the last 5% of the tokens
(pretraining) or the first 1/20 of the records (SFT), as in launch/train.py.

Every file is written into a hidden ``.NAME.tmp-*`` directory beside the target, which is
renamed into place once ``index.json`` is written: a killed prepare leaves no directory that
a reader would take for a prepared one (the hidden one can be deleted).
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import tokenize_worker as protocol

logger = logging.getLogger("mlorc_dist.corpus")

FORMAT = "mlorc-token-shards"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
TOKENIZER_DIR = "tokenizer"
DOCUMENTS_FILE = "documents.bin"
PROMPT_LENGTHS_FILE = "prompt_lengths.bin"
DEFAULT_SHARD_TOKENS = 1 << 27            # 256 MiB of uint16 per shard
DEFAULT_CHUNK_CHARS = 1 << 18             # characters per message to a worker (~50 MB worker RSS)
TEXT_SUFFIXES = (".txt", ".text", ".md")
RECORD_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
EVAL_FRACTION = 0.05
PROGRESS_EVERY_S = 30.0
SFT_EVAL_DIVISOR = 20
IGNORE_INDEX = -100
TOKEN_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_BOOTSTRAP = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"


# --------------------------------------------------------------------------- small helpers
def token_dtype_name(vocab_size: int) -> str:
    """The narrowest shard dtype that holds every id of a vocabulary of ``vocab_size``."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def num_eval_tokens(num_tokens: int, fraction: float = EVAL_FRACTION) -> int:
    """Tokens held out at the end of the concatenation: the rule of data.split_train_eval."""
    held = int(round(num_tokens * fraction))
    if held == 0 or held == num_tokens:
        raise ValueError(f"{num_tokens} tokens are too few to split with eval_fraction={fraction}")
    return held


def num_eval_records(num_records: int) -> int:
    """SFT records held out at the start (the first 1/20, at least one)."""
    return max(1, num_records // SFT_EVAL_DIVISOR)


def file_sha256(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def content_digest(path: Path, memo_dir: Path | None = None) -> str:
    """SHA-256 of the file's bytes, remembered under ``memo_dir`` by path, size, mtime and
    inode, so that a large file is hashed once per version, not at every start."""
    path = Path(path).resolve()
    stat = path.stat()
    if memo_dir is None:
        return file_sha256(path)
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}".encode()).hexdigest()[:32]
    memo = memo_dir / key
    if memo.is_file():
        return memo.read_text().strip()
    digest = file_sha256(path)
    _write_text_atomic(memo, digest)
    return digest


def _write_text_atomic(target: Path, text: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, target)


def tokenizer_hash(tokenizer) -> str:
    """A hash of what decides the ids: the backend tokenizer's definition (with transformers'
    per-call truncation and padding cleared) and the eos id appended after documents."""
    from tokenizers import Tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer; token "
                         "shards need one (AutoTokenizer.from_pretrained(..., use_fast=True))")
    normalised = Tokenizer.from_str(backend.to_str())
    normalised.no_truncation()
    normalised.no_padding()
    payload = json.dumps({"tokenizer": json.loads(normalised.to_str()), "eos": tokenizer.eos_token_id,
                          "split_special_tokens": bool(getattr(tokenizer, "split_special_tokens", False))},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_hf_tokenizer(directory: str | os.PathLike):
    """An HF tokenizer directory (tokenizer.json, tokenizer_config.json), loaded offline."""
    from transformers import AutoTokenizer
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer in {path} has no eos token (needed between documents)")
    return tokenizer


# --------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class Fields:
    """Which record fields hold the text: ``text`` (pretraining) or ``prompt``/``response`` (SFT)."""
    task: str = "pretrain"
    text: str = "text"
    prompt: str = "prompt"
    response: str = "response"

    def record_fields(self) -> list[str]:
        return [self.text] if self.task == "pretrain" else [self.prompt, self.response]

    def describe(self) -> dict:
        return {"text": self.text} if self.task == "pretrain" else {"prompt": self.prompt, "response": self.response}


def list_source_files(spec: str | os.PathLike) -> list[Path]:
    """The data files named by ``spec``: a file, a directory (every supported file below it,
    sorted by relative path) or a glob pattern (sorted)."""
    path = Path(spec).expanduser()
    supported = TEXT_SUFFIXES + tuple(RECORD_KINDS)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted((f for f in path.rglob("*") if f.is_file() and f.suffix in supported
                        and not any(part.startswith(".") for part in f.relative_to(path).parts)),
                       key=lambda f: f.relative_to(path).as_posix())
    else:
        files = sorted(Path(m) for m in glob.glob(str(spec), recursive=True) if Path(m).is_file())
    if not files:
        raise FileNotFoundError(f"data file not found: no file matches {spec}")
    unsupported = [str(f) for f in files if f.suffix not in supported]
    if unsupported:
        raise ValueError(f"unsupported data file type: {unsupported[0]} (use {', '.join(supported)})")
    return [f.resolve() for f in files]


def _stream_tables(path: Path, chunk_chars: int, rows: int = 1024) -> Iterator[Any]:
    """pyarrow tables of ``path``'s rows, streamed by ``datasets`` (nothing cached on disk)."""
    from datasets import load_dataset
    if path.suffix in TEXT_SUFFIXES:
        # keep_linebreaks and text mode: the lines of data.read_text_lines; a small chunk
        # keeps pyarrow's pool from holding 10 MB reads (the lines are the same at any size).
        data = load_dataset("text", data_files=[str(path)], split="train", streaming=True,
                            keep_linebreaks=True, chunksize=max(1 << 16, chunk_chars))
    else:
        data = load_dataset(RECORD_KINDS[path.suffix], data_files=[str(path)], split="train", streaming=True)
    return data.with_format("arrow").iter(batch_size=rows)


@dataclass
class Job:
    """One message's worth of texts and how its ids become documents.

    kind: "lines" (part of a text file's document; no eos), "records" (each text a document,
    eos after each), "sft" (texts alternate prompt, response: each pair a document, eos after
    the response), "end" (no texts: close the current text document with eos)."""
    kind: str
    texts: list[str]
    origin: str


def _column_texts(table, field: str, path: Path, first_row: int) -> list[str]:
    values = table.column(field).to_pylist()
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise ValueError(f"{path}: record {first_row + i} has no {field!r} text (got {type(value).__name__})")
    return values


def iter_jobs(files: list[Path], fields: Fields, chunk_chars: int = DEFAULT_CHUNK_CHARS) -> Iterator[Job]:
    """The corpus as Jobs of about ``chunk_chars`` characters, in file order."""
    for path in files:
        is_text = path.suffix in TEXT_SUFFIXES
        if is_text and fields.task == "sft":
            raise ValueError(f"{path}: --task sft needs prompt/response records (.jsonl, .json, .parquet)")
        kind = "lines" if is_text else ("records" if fields.task == "pretrain" else "sft")
        texts: list[str] = []
        size, row = 0, 0
        for table in _stream_tables(path, chunk_chars):
            if is_text:
                batch = table.column(0).to_pylist()
            else:
                missing = [f for f in fields.record_fields() if f not in table.column_names]
                if missing:
                    raise ValueError(f"{path} records lack field(s) {missing}; they have {table.column_names}")
                if fields.task == "pretrain":
                    batch = _column_texts(table, fields.text, path, row)
                else:
                    prompts = _column_texts(table, fields.prompt, path, row)
                    responses = _column_texts(table, fields.response, path, row)
                    batch = [t for pair in zip(prompts, responses) for t in pair]
            row += table.num_rows
            texts.extend(batch)
            size += sum(map(len, batch))
            if size >= chunk_chars:
                yield Job(kind, texts, str(path))
                texts, size = [], 0
        if texts:
            yield Job(kind, texts, str(path))
        if is_text:
            yield Job("end", [], str(path))


# --------------------------------------------------------------------------- workers
class WorkerPool:
    """``workers`` tokenising processes (mlorc_dist/tokenize_worker.py) fed round-robin, so
    answers come back in the order the texts were sent."""

    def __init__(self, tokenizer, workers: int):
        setup = {"tokenizer": tokenizer.backend_tokenizer.to_str(),
                 "encode_special_tokens": bool(getattr(tokenizer, "split_special_tokens", False))}
        script = str(Path(protocol.__file__).resolve())
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", RAYON_NUM_THREADS="1", OMP_NUM_THREADS="1")
        self.procs = [subprocess.Popen([sys.executable, "-c", _BOOTSTRAP, script], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, env=env) for _ in range(workers)]
        self.next = 0
        for proc in self.procs:
            protocol.write_message(proc.stdin, setup)

    def __len__(self) -> int:
        return len(self.procs)

    def submit(self, texts: list[str]) -> int:
        """Send ``texts`` to the next worker; returns that worker's number."""
        worker = self.next
        self.next = (self.next + 1) % len(self.procs)
        try:
            protocol.write_message(self.procs[worker].stdin, texts)
        except BrokenPipeError:
            self._fail(worker, "stopped")
        return worker

    def result(self, worker: int) -> tuple[np.ndarray, np.ndarray]:
        """The oldest unanswered (lengths, ids) of ``worker``."""
        answer = protocol.read_message(self.procs[worker].stdout)
        if answer is None:
            self._fail(worker, "exited")
        if isinstance(answer, tuple) and len(answer) == 2 and isinstance(answer[0], str):
            raise RuntimeError(f"tokenising worker {worker} failed:\n{answer[1]}")
        return answer

    def _fail(self, worker: int, what: str):
        code = self.procs[worker].poll()
        raise RuntimeError(f"tokenising worker {worker} {what} (exit code {code})")

    def close(self, abort: bool = False) -> None:
        """Let every worker finish and exit; with ``abort`` (after an error), kill them: their
        unread answers could keep them blocked on a full pipe."""
        for proc in self.procs:
            if abort:
                proc.kill()
                continue
            try:
                protocol.write_message(proc.stdin, None)
                proc.stdin.close()
            except (BrokenPipeError, ValueError):
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()
            if not proc.stdin.closed:
                proc.stdin.close()


def tokenised_jobs(jobs: Iterator[Job], pool: WorkerPool, depth: int = 2):
    """(job, lengths, ids) in job order, with up to ``depth`` messages queued per worker so
    that no worker waits while the reader prepares the next texts."""
    pending: deque = deque()
    busy = 0
    exhausted = False
    while True:
        while not exhausted and busy < depth * len(pool):
            job = next(jobs, None)
            if job is None:
                exhausted = True
            elif not job.texts:
                pending.append((job, None))
            else:
                pending.append((job, pool.submit(job.texts)))
                busy += 1
        if not pending:
            return
        job, worker = pending.popleft()
        if worker is None:
            yield job, np.zeros(0, np.int64), np.zeros(0, np.uint32)
        else:
            lengths, ids = pool.result(worker)
            busy -= 1
            yield job, lengths, ids


# --------------------------------------------------------------------------- writer
def documents_from_job(job: Job, lengths: np.ndarray, ids: np.ndarray, eos: int):
    """(tokens to append, document end offsets relative to them, prompt lengths) of one job.

    "lines" adds tokens and no document end; "end" adds an eos and ends the document (the
    writer drops it when the document is empty)."""
    if job.kind == "lines":
        return ids, np.zeros(0, np.int64), None
    if job.kind == "end":
        return np.array([eos], np.uint32), np.array([1], np.int64), None
    if job.kind == "records":
        body_ends = np.cumsum(lengths)
        prompts = None
    elif job.kind == "sft":
        pairs = lengths.reshape(-1, 2)
        body_ends = np.cumsum(pairs.sum(axis=1))
        prompts = pairs[:, 0].astype(np.int32)
    else:
        raise ValueError(f"unknown job kind {job.kind!r}")
    tokens = np.insert(ids, body_ends, np.uint32(eos))
    ends = body_ends + np.arange(1, len(body_ends) + 1)
    return tokens, ends, prompts


class ShardWriter:
    """Appends tokens to fixed-size shards and document ends to documents.bin in ``directory``."""

    def __init__(self, directory: Path, dtype_name: str, shard_tokens: int, sft: bool):
        self.directory, self.dtype, self.shard_tokens = directory, TOKEN_DTYPES[dtype_name], shard_tokens
        self.dtype_name = dtype_name
        self.limit = np.iinfo(self.dtype).max
        self.shards: list[dict] = []
        self.file = None
        self.in_shard = 0
        self.num_tokens = 0
        self.num_documents = 0
        self.open_document = 0          # tokens of the text document not yet closed by "end"
        self.documents = (directory / DOCUMENTS_FILE).open("wb")
        self.prompts = (directory / PROMPT_LENGTHS_FILE).open("wb") if sft else None

    def _write_tokens(self, tokens: np.ndarray) -> None:
        if tokens.size and int(tokens.max()) > self.limit:
            raise ValueError(f"token id {int(tokens.max())} does not fit {self.dtype_name}")
        tokens = tokens.astype(self.dtype, copy=False)
        while tokens.size:
            if self.file is None or self.in_shard == self.shard_tokens:
                self._next_shard()
            take = min(tokens.size, self.shard_tokens - self.in_shard)
            self.file.write(memoryview(np.ascontiguousarray(tokens[:take])).cast("B"))
            self.in_shard += take
            self.shards[-1]["tokens"] = self.in_shard
            self.num_tokens += take
            tokens = tokens[take:]

    def _next_shard(self) -> None:
        if self.file is not None:
            self.file.close()
        name = f"tokens-{len(self.shards):05d}.bin"
        self.file = (self.directory / name).open("wb")
        self.shards.append({"file": name, "tokens": 0})
        self.in_shard = 0

    def add(self, job: Job, lengths: np.ndarray, ids: np.ndarray, eos: int) -> None:
        if job.kind == "end" and self.open_document == 0:
            return                      # an empty text file is no document
        tokens, ends, prompts = documents_from_job(job, lengths, ids, eos)
        start = self.num_tokens
        self._write_tokens(tokens)
        self.open_document = self.open_document + tokens.size if job.kind == "lines" else 0
        if ends.size:
            self.documents.write((start + ends).astype("<i8").tobytes())
            self.num_documents += ends.size
        if prompts is not None:
            self.prompts.write(prompts.astype("<i4").tobytes())

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.documents.close()
        if self.prompts is not None:
            self.prompts.close()


# --------------------------------------------------------------------------- prepare
def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _staging_dir(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    staging.mkdir()
    return staging


def _publish(staging: Path, out: Path) -> None:
    """Rename the finished ``staging`` to ``out``. When another process published ``out``
    first (ranks preparing the same cache entry), its copy is kept and ours removed."""
    try:
        os.replace(staging, out)
    except OSError:
        if (out / INDEX_NAME).is_file():
            shutil.rmtree(staging, ignore_errors=True)
            return
        raise


def prepare(data: str | os.PathLike | list[Path], tokenizer, out: str | os.PathLike, *,
            fields: Fields = Fields(), workers: int | None = None,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, chunk_chars: int = DEFAULT_CHUNK_CHARS,
            memo_dir: Path | None = None, check_wrapper: bool = True) -> Path:
    """Tokenise the files named by ``data`` (file, directory, glob, or a list of files) into
    token shards in ``out``, which must not exist yet (or be empty). Returns ``out``."""
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty: choose another --out or remove it")
    if fields.task not in ("pretrain", "sft"):
        raise ValueError(f"unknown task {fields.task!r}: pretrain or sft")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    files = list(data) if isinstance(data, list) else list_source_files(data)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token (needed between documents)")
    dtype_name = token_dtype_name(len(tokenizer))
    total_bytes = sum(f.stat().st_size for f in files)
    workers = max(1, min(workers or default_workers(), math.ceil(total_bytes / chunk_chars) or 1))
    started = time.perf_counter()
    staging = _staging_dir(out)
    try:
        sources = [{"path": str(f), "bytes": f.stat().st_size, "sha256": content_digest(f, memo_dir)} for f in files]
        writer = ShardWriter(staging, dtype_name, shard_tokens, sft=fields.task == "sft")
        pool = WorkerPool(tokenizer, workers)
        failed = True
        try:
            checked = not check_wrapper
            reported = started
            for job, lengths, ids in tokenised_jobs(iter_jobs(files, fields, chunk_chars), pool):
                if not checked and job.texts:
                    check_same_ids(tokenizer, job, lengths, ids)
                    checked = True
                writer.add(job, lengths, ids, tokenizer.eos_token_id)
                if time.perf_counter() - reported > PROGRESS_EVERY_S:
                    reported = time.perf_counter()
                    logger.info("preparing %s: %d tokens so far (%.0f tokens/s), now in %s", out.name,
                                writer.num_tokens, writer.num_tokens / (reported - started), job.origin)
            failed = False
        finally:
            pool.close(abort=failed)
            writer.close()
        if writer.num_tokens == 0:
            raise ValueError(f"empty corpus: no tokens in {', '.join(str(f) for f in files)}")
        index = {
            "format": FORMAT, "version": FORMAT_VERSION, "task": fields.task, "fields": fields.describe(),
            "dtype": dtype_name, "num_tokens": writer.num_tokens, "num_documents": writer.num_documents,
            "shard_tokens": shard_tokens, "shards": writer.shards,
            "documents": DOCUMENTS_FILE, "prompt_lengths": PROMPT_LENGTHS_FILE if fields.task == "sft" else None,
            "tokenizer_hash": tokenizer_hash(tokenizer), "vocab_size": len(tokenizer),
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
            "source": {"fingerprint": source_fingerprint(sources), "files": sources},
        }
        tokenizer.save_pretrained(str(staging / TOKENIZER_DIR))
        (staging / INDEX_NAME).write_text(json.dumps(index, indent=1) + "\n")
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    seconds = time.perf_counter() - started
    logger.info("prepared %s: %d tokens, %d documents, %d shard(s) in %.1f s (%.0f tokens/s, %d worker(s))",
                out, writer.num_tokens, writer.num_documents, len(writer.shards), seconds,
                writer.num_tokens / max(seconds, 1e-9), workers)
    return out


def source_fingerprint(sources: list[dict]) -> str:
    payload = json.dumps([[s["bytes"], s["sha256"]] for s in sources])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def check_same_ids(tokenizer, job: Job, lengths: np.ndarray, ids: np.ndarray) -> None:
    """The workers call the backend tokenizer directly; refuse a tokenizer whose Python
    wrapper would give other ids for the same text (checked on the first message)."""
    expected = tokenizer(job.texts, add_special_tokens=False)["input_ids"]
    if [len(e) for e in expected] != lengths.tolist() or \
            not np.array_equal(np.concatenate([np.asarray(e, np.int64) for e in expected] or [np.zeros(0)]), ids):
        raise ValueError(f"{type(tokenizer).__name__}: its backend tokenizer gives other ids than "
                         f"tokenizer(text) on {job.origin}; token shards cannot be prepared with it")


# --------------------------------------------------------------------------- reader
class TokenShards:
    """A prepared directory, memory-mapped: ``read(start, stop)`` returns the ids of the global
    range [start, stop) as int64, across shard boundaries. Opening checks the index and every
    file's size, and, with ``tokenizer``, that the ids were made by that tokenizer."""

    def __init__(self, directory: str | os.PathLike, tokenizer=None, task: str | None = None):
        self.directory = Path(directory).expanduser()
        index_file = self.directory / INDEX_NAME
        if not self.directory.is_dir():
            raise FileNotFoundError(f"data directory not found: {self.directory}")
        if not index_file.is_file():
            raise FileNotFoundError(f"{index_file} is missing: {self.directory} is not a prepared token "
                                    "directory (python -m mlorc_dist.data prepare --data ... --out DIR)")
        try:
            self.index = json.loads(index_file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{index_file} is not valid JSON: {err}") from None
        if self.index.get("format") != FORMAT or self.index.get("version") != FORMAT_VERSION:
            raise ValueError(f"{index_file}: format {self.index.get('format')!r} version "
                             f"{self.index.get('version')!r}, expected {FORMAT!r} version {FORMAT_VERSION}")
        if task is not None and self.index["task"] != task:
            raise ValueError(f"{index_file}: prepared for --task {self.index['task']}, this run is --task {task}")
        if tokenizer is not None and tokenizer_hash(tokenizer) != self.index["tokenizer_hash"]:
            raise ValueError(f"{index_file}: prepared with another tokenizer (hash {self.index['tokenizer_hash']}, "
                             f"this run's is {tokenizer_hash(tokenizer)}); prepare the data again with this "
                             f"tokenizer, or train with the one in {self.directory / TOKENIZER_DIR}")
        self.dtype = TOKEN_DTYPES[self.index["dtype"]]
        self.shard_tokens = int(self.index["shard_tokens"])
        self.num_tokens = int(self.index["num_tokens"])
        self.num_documents = int(self.index["num_documents"])
        self._check_layout()
        self.shards = [np.memmap(self.directory / s["file"], dtype=self.dtype, mode="r")
                       for s in self.index["shards"]]
        self.document_ends = self._optional_map(self.index["documents"], "<i8", self.num_documents)
        self.prompt_lengths = self._optional_map(self.index.get("prompt_lengths"), "<i4", self.num_documents)

    def _check_layout(self) -> None:
        shards = self.index["shards"]
        counts = [int(s["tokens"]) for s in shards]
        if sum(counts) != self.num_tokens or any(c != self.shard_tokens for c in counts[:-1]) or \
                not counts or counts[-1] < 1 or counts[-1] > self.shard_tokens:
            raise ValueError(f"{self.directory / INDEX_NAME}: shard token counts {counts} do not tile "
                             f"{self.num_tokens} tokens in shards of {self.shard_tokens}")
        expected = [(s["file"], int(s["tokens"]) * self.dtype.itemsize) for s in shards]
        expected.append((self.index["documents"], 8 * self.num_documents))
        if self.index.get("prompt_lengths"):
            expected.append((self.index["prompt_lengths"], 4 * self.num_documents))
        for name, size in expected:
            path = self.directory / name
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing (listed in {self.directory / INDEX_NAME})")
            actual = path.stat().st_size
            if actual != size:
                raise ValueError(f"{path} is truncated or damaged: {actual} bytes, the index says {size}; "
                                 "prepare the data again")

    def _optional_map(self, name: str | None, dtype: str, count: int):
        if not name or count == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(self.directory / name, dtype=dtype, mode="r", shape=(count,))

    def __len__(self) -> int:
        return self.num_tokens

    def read(self, start: int, stop: int) -> np.ndarray:
        """Token ids of the global range [start, stop), int64."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"range [{start}, {stop}) outside the {self.num_tokens} tokens of {self.directory}")
        out = np.empty(stop - start, dtype=np.int64)
        position = start
        while position < stop:
            shard, offset = divmod(position, self.shard_tokens)
            take = min(stop - position, self.shard_tokens - offset)
            out[position - start:position - start + take] = self.shards[shard][offset:offset + take]
            position += take
        return out

    def document(self, i: int) -> tuple[int, int]:
        """[start, stop) of document ``i`` in the concatenation."""
        stop = int(self.document_ends[i])
        return (int(self.document_ends[i - 1]) if i else 0), stop

    def load_tokenizer(self):
        return load_hf_tokenizer(self.directory / TOKENIZER_DIR)


def is_prepared(directory: Path) -> bool:
    return (Path(directory) / INDEX_NAME).is_file()


# --------------------------------------------------------------------------- training sources
def windows(shards: TokenShards, starts, seq_len: int):
    """[len(starts), seq_len] int64 tensor of the windows starting at global ``starts``."""
    import torch
    rows = [shards.read(int(s), int(s) + seq_len) for s in starts]
    return torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, seq_len, dtype=torch.long)


def packed_source(shards: TokenShards, seq_len: int, eval_fraction: float = EVAL_FRACTION) -> Callable:
    """GlobalBatches source of random windows of the training part (all but the last
    ``eval_fraction`` of the tokens): the same offsets, from the same generator, as
    training.packed_source over the in-memory ids, so the batches are those of that path."""
    import torch
    num_train = shards.num_tokens - num_eval_tokens(shards.num_tokens, eval_fraction)
    if num_train <= seq_len:
        raise ValueError(f"{num_train} training tokens are fewer than one window of {seq_len}")

    def draw(generator, count):
        starts = torch.randint(num_train - seq_len + 1, (count,), generator=generator)
        batch = windows(shards, starts.tolist(), seq_len)
        return batch, batch
    return draw


def eval_windows(shards: TokenShards, seq_len: int, count: int, eval_fraction: float = EVAL_FRACTION):
    """The first ``count`` non-overlapping windows of the held-out tail, [n, seq_len] int64."""
    held = num_eval_tokens(shards.num_tokens, eval_fraction)
    available = held // seq_len
    if available == 0:
        raise ValueError(f"{held} tokens are fewer than one window of seq_len={seq_len}")
    n = min(count, available)
    start = shards.num_tokens - held
    import torch
    return torch.from_numpy(shards.read(start, start + n * seq_len).reshape(n, seq_len))


def sft_rows(shards: TokenShards, records, seq_len: int, pad_id: int):
    """(input_ids, labels) [len(records), seq_len] of SFT records: prompt + response + eos,
    truncated and right-padded, labels IGNORE_INDEX on the prompt and the padding (as
    training.load_sft_records)."""
    import torch
    inputs = np.full((len(records), seq_len), pad_id, dtype=np.int64)
    labels = np.full((len(records), seq_len), IGNORE_INDEX, dtype=np.int64)
    for row, record in enumerate(records):
        start, stop = shards.document(int(record))
        ids = shards.read(start, min(stop, start + seq_len))
        prompt = min(int(shards.prompt_lengths[int(record)]), ids.size)
        inputs[row, :ids.size] = ids
        labels[row, prompt:ids.size] = ids[prompt:]
    return torch.from_numpy(inputs), torch.from_numpy(labels)


def sft_sources(shards: TokenShards, seq_len: int, pad_id: int, eval_count: int):
    """(GlobalBatches source over the training records, eval (input_ids, labels)): the first
    1/20 of the records are held out, as launch/train.py does with in-memory records; eval
    uses the first ``eval_count`` of them."""
    import torch
    if shards.index["task"] != "sft":
        raise ValueError(f"{shards.directory} holds pretraining text, not SFT records")
    if not bool((np.asarray(shards.prompt_lengths) < seq_len).any()):
        raise ValueError(f"{shards.directory}: every response was truncated away at seq_len={seq_len}")
    held = num_eval_records(shards.num_documents)
    if shards.num_documents - held < 1:
        raise ValueError(f"{shards.directory}: {shards.num_documents} record(s) leave none to train on")

    def draw(generator, count):
        index = torch.randint(shards.num_documents - held, (count,), generator=generator)
        return sft_rows(shards, (index + held).tolist(), seq_len, pad_id)
    return draw, sft_rows(shards, range(min(held, eval_count)), seq_len, pad_id)


# --------------------------------------------------------------------------- the cache
def cached_corpus_dir(path: Path, tokenizer, fields: Fields, cache: Path) -> Path:
    """Where ``path`` prepared with ``tokenizer`` lives in the cache: keyed by the file's
    content, its type, the tokenizer and the fields read."""
    digest = content_digest(path, cache / "content-digests")
    read_fields = None if path.suffix in TEXT_SUFFIXES else fields.describe()   # a text file has none
    key = json.dumps({"version": FORMAT_VERSION, "content": digest, "suffix": path.suffix,
                      "tokenizer": tokenizer_hash(tokenizer), "fields": read_fields, "task": fields.task},
                     sort_keys=True)
    return cache / "corpora" / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def open_training_data(data: str | os.PathLike, tokenizer, *, fields: Fields = Fields(), cache: Path,
                       workers: int | None = None, rank: int = 0,
                       barrier: Callable[[], None] | None = None) -> TokenShards:
    """Token shards for training: ``data`` a prepared directory, or a file prepared once into
    ``cache`` (rank 0 prepares while the other ranks wait at ``barrier``; a rank that still
    finds nothing, e.g. behind a node-local cache, prepares its own copy)."""
    path = Path(data).expanduser()
    if path.is_dir():
        return TokenShards(path, tokenizer=tokenizer, task=fields.task)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    path = path.resolve()
    if rank == 0:
        _prepare_cached(path, tokenizer, fields, cache, workers)
    if barrier is not None:
        barrier()
    target = _prepare_cached(path, tokenizer, fields, cache, workers)
    return TokenShards(target, tokenizer=tokenizer, task=fields.task)


def _prepare_cached(path: Path, tokenizer, fields: Fields, cache: Path, workers: int | None) -> Path:
    target = cached_corpus_dir(path, tokenizer, fields, cache)
    if not is_prepared(target):
        logger.info("preparing %s into %s (once; later runs memory-map it)", path, target)
        prepare([path], tokenizer, target, fields=fields, workers=workers, memo_dir=cache / "content-digests")
    return target


# --------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlorc_dist.data",
                                     description="Tokenise a corpus once into memory-mapped token shards.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="tokenise files into a token shard directory")
    p.add_argument("--data", required=True, help="a file, a directory (all .txt/.md/.jsonl/.json/.parquet "
                                                 "below it) or a glob pattern (quote it)")
    p.add_argument("--tokenizer", required=True, help="an HF tokenizer directory")
    p.add_argument("--out", required=True, help="the directory to create")
    p.add_argument("--workers", type=int, default=None, help="tokenising processes (default: all cores)")
    p.add_argument("--task", default="pretrain", choices=("pretrain", "sft"))
    p.add_argument("--text-field", default="text")
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--response-field", default="response")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard file")
    show = commands.add_parser("info", help="print a prepared directory's index summary")
    show.add_argument("directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.command == "info":
        shards = TokenShards(args.directory)
        summary = {k: shards.index[k] for k in ("task", "dtype", "num_tokens", "num_documents", "tokenizer_hash")}
        summary["shards"] = len(shards.shards)
        print(json.dumps(summary, indent=1))
        return 0
    tokenizer = load_hf_tokenizer(args.tokenizer)
    fields = Fields(args.task, args.text_field, args.prompt_field, args.response_field)
    out = prepare(args.data, tokenizer, args.out, fields=fields, workers=args.workers,
                  shard_tokens=args.shard_tokens)
    index = TokenShards(out).index
    print(json.dumps({"out": str(out), "num_tokens": index["num_tokens"], "num_documents": index["num_documents"],
                      "shards": len(index["shards"]), "dtype": index["dtype"]}, indent=1))
    return 0

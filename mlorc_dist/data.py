"""Offline English text for small training runs: corpus, tokenizer, token ids and batches.

Everything here works without network access:

* the demo corpus is the English prose that ships with every CPython
  (``pydoc_data.topics``: the help texts of ``help("if")`` and friends, ~465k characters);
* the tokenizer is a byte-level BPE trained locally with the ``tokenizers`` library;
* text files are read with ``datasets.load_dataset("text", ...)``, so the same path reads
  a user's own ``.txt`` files.

Expensive results (tokenizer, token ids) are cached on disk, keyed by a hash of what they
were computed from, so the second call is instant. Every cache write is atomic
(temporary file + ``os.replace``), so an interrupted run never leaves half a file behind.

At scale, ``python -m mlorc_dist.data prepare --data FILE|DIR|GLOB --tokenizer DIR --out DIR``
tokenises a corpus once, in parallel, into memory-mapped token shards (mlorc_dist.corpus), the
form launch/train.py trains from.

Typical use::

    corpus = default_corpus_path()
    tokenizer = train_tokenizer([str(corpus)], vocab_size=2048)
    ids = load_token_ids(corpus, tokenizer)
    train_ids, eval_ids = split_train_eval(ids)
    for input_ids in PackedBatches(train_ids, batch_size=16, seq_len=128, seed=0):
        loss = model(input_ids=input_ids, labels=input_ids).loss  # HF shifts labels itself
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
# Order fixes the ids: pad=0, bos=1, eos=2, the same bos/eos ids LlamaConfig defaults to.
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
BYTE_ALPHABET_SIZE = 256

DEFAULT_CORPUS_NAME = "pydoc_topics.txt"
TOKENIZE_BATCH_LINES = 1024


# --------------------------------------------------------------------------- cache helpers


def cache_root() -> Path:
    """The directory for this library's caches: ``$MLORC_CACHE`` or ``~/.cache/mlorc_dist``."""
    configured = os.environ.get("MLORC_CACHE")
    root = Path(configured) if configured else Path.home() / ".cache" / "mlorc_dist"
    return root.expanduser()


def _atomic_write(target: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``target``, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp_name)
    try:
        write(tmp_path)
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def _existing_text_file(path: str | os.PathLike) -> Path:
    """Resolve ``path``; raise FileNotFoundError if it is absent and ValueError if it is empty."""
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise FileNotFoundError(f"text file not found: {resolved}")
    if resolved.stat().st_size == 0:
        raise ValueError(f"text file is empty: {resolved}")
    return resolved


def _fingerprint(files: list[Path], **extra: Any) -> str:
    """A short hash of the files' paths, sizes and mtimes plus ``extra``: a cache key."""
    described = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    payload = json.dumps({"files": described, **extra}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- corpus


def default_corpus_path() -> Path:
    """Path of the demo corpus: CPython's ``pydoc_data.topics`` prose, written once to the cache.

    ``pydoc_data.topics.topics`` maps a help topic ("if", "for", "exprlists", ...) to a few
    paragraphs of English documentation. The values, joined by blank lines, form the corpus.
    """
    from pydoc_data.topics import topics

    target = cache_root() / DEFAULT_CORPUS_NAME
    if not target.is_file():
        text = "\n\n".join(topics[name].strip() for name in sorted(topics)) + "\n"
        _atomic_write(target, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return target


def docstring_corpus_path(max_chars: int = 1_500_000) -> Path:
    """Path of a second English corpus, for fine-tuning runs: the docstrings of the Python
    standard library's own source files (module, class and function docstrings of at least 80
    characters, parsed with ``ast``: nothing is imported), in sorted file order, at most
    ``max_chars`` characters, written once to the cache. Prose about APIs, where the demo
    corpus (``default_corpus_path``) is prose about the language."""
    import ast
    import sysconfig

    version = f"{sys.version_info.major}{sys.version_info.minor}"
    target = cache_root() / f"stdlib_docstrings_py{version}_{max_chars}.txt"
    if target.is_file():
        return target
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo"}
    docs, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 80:
                    docs.append(doc.strip())
                    total += len(doc) + 2
        if total >= max_chars:
            break
    if not docs:
        raise FileNotFoundError(f"no docstrings found under the standard library at {root}")
    text = "\n\n".join(docs)[:max_chars] + "\n"
    _atomic_write(target, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return target


def read_text_lines(paths: list[Path], cache_dir: Path) -> list[str]:
    """All lines of the text files, newlines kept, in file order, read with ``datasets``.

    Keeping the newlines makes ``"".join(lines)`` equal the files' concatenated contents.
    """
    from datasets import load_dataset

    dataset = load_dataset(
        "text",
        data_files={"train": [str(p) for p in paths]},
        split="train",
        keep_linebreaks=True,
        cache_dir=str(cache_dir / "datasets"),
    )
    return dataset["text"]


# --------------------------------------------------------------------------- tokenizer


def _wrap_tokenizer(tokenizer_file: Path) -> "PreTrainedTokenizerFast":
    """Load a ``tokenizers`` JSON file as a transformers tokenizer with bos/eos/pad set."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
    )


def train_tokenizer(
    text_files: list[str], vocab_size: int, cache_dir: str | os.PathLike | None = None
) -> "PreTrainedTokenizerFast":
    """A byte-level BPE tokenizer trained on ``text_files``, cached under ``cache_dir``.

    The cache key hashes the files' paths, sizes and mtimes and ``vocab_size``; editing a file
    or asking for another vocabulary size trains a new tokenizer. Byte-level means every
    string can be encoded (no unknown token) and ``decode(encode(text)) == text``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    min_vocab = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size={vocab_size} is below the byte alphabet plus special tokens ({min_vocab})")
    if not text_files:
        raise ValueError("train_tokenizer needs at least one text file")
    files = [_existing_text_file(f) for f in text_files]
    cache = Path(cache_dir) if cache_dir is not None else cache_root()
    tokenizer_file = cache / f"tokenizer-bpe-{_fingerprint(files, vocab_size=vocab_size)}.json"

    if not tokenizer_file.is_file():
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        bpe.train_from_iterator(read_text_lines(files, cache), trainer=trainer)
        _atomic_write(tokenizer_file, lambda tmp: bpe.save(str(tmp)))
    return _wrap_tokenizer(tokenizer_file)


def _tokenizer_hash(tokenizer: "PreTrainedTokenizerFast") -> str:
    """A hash of the tokenizer's full definition (vocabulary, merges, normalisation)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- token ids


def tokenize_lines(lines: list[str], tokenizer: "PreTrainedTokenizerFast") -> torch.Tensor:
    """Token ids of the concatenated lines as a 1-D int64 tensor (no special tokens)."""
    ids: list[int] = []
    for start in range(0, len(lines), TOKENIZE_BATCH_LINES):
        batch = lines[start : start + TOKENIZE_BATCH_LINES]
        for line_ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            ids.extend(line_ids)
    return torch.tensor(ids, dtype=torch.long)


def load_token_ids(
    path: str | os.PathLike,
    tokenizer: "PreTrainedTokenizerFast",
    cache_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """The text file at ``path`` tokenised into a 1-D LongTensor, with one eos token at the end.

    Cached as a ``.pt`` file keyed by the file's path, size and mtime and a hash of the
    tokenizer, so a second call only loads the tensor.
    """
    text_file = _existing_text_file(path)
    cache = Path(cache_dir) if cache_dir is not None else cache_root()
    key = _fingerprint([text_file], tokenizer=_tokenizer_hash(tokenizer))
    ids_file = cache / f"ids-{text_file.stem}-{key}.pt"

    if ids_file.is_file():
        return torch.load(ids_file, weights_only=True)

    body = tokenize_lines(read_text_lines([text_file], cache), tokenizer)
    if body.numel() == 0:
        raise ValueError(f"text file has no tokens: {text_file}")
    ids = torch.cat([body, torch.tensor([tokenizer.eos_token_id], dtype=torch.long)])
    _atomic_write(ids_file, lambda tmp: torch.save(ids, tmp))
    return ids


def split_train_eval(ids: torch.Tensor, eval_fraction: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Split 1-D token ids into (train, eval): the last ``eval_fraction`` of the tokens is eval.

    A contiguous tail (not a random sample) keeps eval text unseen by any training window.
    """
    if ids.dim() != 1:
        raise ValueError(f"expected 1-D token ids, got shape {tuple(ids.shape)}")
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    num_eval = int(round(ids.numel() * eval_fraction))
    if num_eval == 0 or num_eval == ids.numel():
        raise ValueError(f"{ids.numel()} tokens are too few to split with eval_fraction={eval_fraction}")
    return ids[:-num_eval], ids[-num_eval:]


def contiguous_windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len`` tokens covering ``ids`` (the ragged tail dropped).

    Returns [num_windows, seq_len]; used for a fixed, deterministic eval set.
    """
    num_windows = ids.numel() // seq_len
    if num_windows == 0:
        raise ValueError(f"{ids.numel()} tokens are fewer than one window of seq_len={seq_len}")
    return ids[: num_windows * seq_len].view(num_windows, seq_len)


# --------------------------------------------------------------------------- batches


class PackedBatches:
    """An endless, deterministic stream of [batch_size, seq_len] windows of packed tokens.

    Each batch holds ``batch_size`` windows starting at offsets drawn uniformly from a
    ``torch.Generator`` seeded with ``seed``; windows may cross document boundaries (packing).
    Use the batch as both ``input_ids`` and ``labels``: HF causal LMs shift labels internally.

    ``state_dict()`` captures the generator state and the number of batches drawn, so a run
    restored with ``load_state_dict()`` continues with exactly the batches it would have seen.
    """

    def __init__(self, ids: torch.Tensor, batch_size: int, seq_len: int, seed: int):
        if ids.dim() != 1:
            raise ValueError(f"expected 1-D token ids, got shape {tuple(ids.shape)}")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
        if ids.numel() < seq_len:
            raise ValueError(f"{ids.numel()} tokens are fewer than one window of seq_len={seq_len}")
        self.ids = ids
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0
        self._window = torch.arange(seq_len)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        num_starts = self.ids.numel() - self.seq_len + 1
        starts = torch.randint(num_starts, (self.batch_size,), generator=self.generator)
        self.batches_drawn += 1
        return self.ids[starts[:, None] + self._window]  # [B, T]

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator_state": self.generator.get_state(),
            "batches_drawn": self.batches_drawn,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("batch_size", "seq_len"):
            if state[name] != getattr(self, name):
                raise ValueError(f"state was saved with {name}={state[name]}, this stream has {getattr(self, name)}")
        self.generator.set_state(state["generator_state"])
        self.batches_drawn = state["batches_drawn"]
        self.seed = state["seed"]


if __name__ == "__main__":   # python -m mlorc_dist.data prepare ...: see mlorc_dist.corpus
    from mlorc_dist.corpus import main

    sys.exit(main())


def records_text_file(path: str | os.PathLike, fields: list[str], cache_dir: str | os.PathLike | None = None) -> Path:
    """The text of `fields` of every record of a .jsonl / .json / .parquet file, one field value
    after another, as a text file in the cache (keyed by the file and the fields): what a
    tokenizer trained for these records learns from. Streams the records (never all at once)."""
    from datasets import load_dataset

    source = _existing_text_file(path)
    kinds = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
    if source.suffix not in kinds:
        raise ValueError(f"{source}: records are read from .jsonl, .json or .parquet, not {source.suffix!r}")
    cache = Path(cache_dir) if cache_dir is not None else cache_root()
    target = cache / "record_text" / f"{source.stem}-{_fingerprint([source], fields=fields)}.txt"
    if target.is_file():
        return target

    def write(tmp: Path) -> None:
        records = load_dataset(kinds[source.suffix], data_files=str(source), split="train", streaming=True)
        with tmp.open("w") as out:
            for record in records:
                for field in fields:
                    if field not in record:
                        raise ValueError(f"{source}: a record lacks field {field!r}; it has {sorted(record)}")
                    out.write(f"{record[field]}\n")
        if tmp.stat().st_size == 0:
            raise ValueError(f"{source} holds no records")

    _atomic_write(target, write)
    return target

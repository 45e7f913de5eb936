"""A tokenising worker process for mlorc_dist.corpus.

It is started as ``python -c BOOTSTRAP this_file`` and imports only the standard library,
``tokenizers`` and ``numpy``: importing the ``mlorc_dist`` package would import torch, which
costs ~250 MB of resident memory per worker for nothing.

Protocol on stdin/stdout, every message an 8-byte little-endian length and a pickle:

* first message in: ``{"tokenizer": <tokenizer.json text>, "encode_special_tokens": bool}``;
* then any number of ``list[str]`` in, each answered by ``(lengths, ids)``: the token count of
  every string (int64) and all their ids concatenated (uint32), without special tokens;
* ``None`` in (or end of input): exit. A failure answers ``("error", traceback text)``.

stdin is drained by a thread so that the parent can queue the next texts while this process
is still writing an answer; otherwise a large answer and a large request could block each
other in the pipes.
"""
from __future__ import annotations

import os
import pickle
import queue
import struct
import sys
import threading
import traceback

import numpy as np

HEADER = struct.Struct("<Q")


def read_message(stream):
    """The next message of ``stream``, or None at end of input."""
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    (size,) = HEADER.unpack(header)
    payload = stream.read(size)
    if len(payload) < size:
        return None
    return pickle.loads(payload)


def write_message(stream, obj) -> None:
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(HEADER.pack(len(payload)))
    stream.write(payload)
    stream.flush()


def encode(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(token count per text, all ids concatenated) of ``texts`` without special tokens."""
    encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # no offsets
    encodings = encode_batch(texts, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
    ids = np.empty(int(lengths.sum()), dtype=np.uint32)
    position = 0
    for encoding, length in zip(encodings, lengths.tolist()):
        ids[position:position + length] = encoding.ids
        position += length
    return lengths, ids


def load_tokenizer(setup: dict):
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_str(setup["tokenizer"])
    # transformers' __call__ sets these per call; without truncation/padding it clears them.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    tokenizer.encode_special_tokens = bool(setup["encode_special_tokens"])
    return tokenizer


def main() -> int:
    # One thread per worker (set before tokenizers is imported): the parent's worker count is
    # then the number of busy cores, with no thread pool of the tokenizers library beside it.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    inbox: queue.Queue = queue.Queue()

    def drain():
        while True:
            message = read_message(source)
            inbox.put(message)
            if message is None:
                return

    threading.Thread(target=drain, daemon=True).start()
    try:
        tokenizer = load_tokenizer(inbox.get())
    except Exception:  # noqa: BLE001 - the parent reports it
        write_message(sink, ("error", traceback.format_exc()))
        return 1
    while True:
        texts = inbox.get()
        if texts is None:
            return 0
        try:
            answer = encode(tokenizer, texts)
        except Exception:  # noqa: BLE001 - the parent reports it
            write_message(sink, ("error", traceback.format_exc()))
            return 1
        write_message(sink, answer)


if __name__ == "__main__":
    sys.exit(main())

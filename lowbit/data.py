"""Data pipelines (grain): the default byte corpus, text files, token arrays; packing into batches.

Tokens. Text is read as bytes: token = byte value (0..255, `vocab_size` 256). Byte 0 never occurs in
source text, so it is appended after every document as the separator. `.npy` files hold 1-D integer
token arrays that are used as-is (no separator is added: put your own end-of-document id in them).

Corpus. `data=None` is the Python standard library's own `.py` files (`sysconfig.get_paths()["stdlib"]`,
including its `test`/`tests` packages, excluding `site-packages`, `dist-packages`, `__pycache__`):
real code nobody here wrote, present on every machine (its content depends on the Python version).
Tests are kept because they are ordinary Python and double the corpus (~31 MB instead of ~12 MB on
CPython 3.11), which matters more for minutes-long GPU runs than their odd corners.

Split. A file goes to validation when the first 8 bytes of sha256(its path relative to the corpus
root), read as a fraction of 2**64, fall below `val_fraction`; so the split depends on names, not on
the machine's directory order. At least one file lands on each side when there are two or more files;
a one-file corpus holds out its last `val_fraction` of tokens instead.

Packing (concat-and-chunk). Each split's documents are concatenated into one token stream `s`
(training: in an order fixed by `seed`, sorted when `shuffle=False`; validation: always sorted).
Sequence i is the window s[i*T : i*T + T + 1] of T+1 tokens (windows overlap by one token, so every
token but the first is a target exactly once per epoch); `inputs = window[:-1]`,
`targets = window[1:]`. A window may span documents; the 0 byte between them marks the boundary
(attention is not masked across it). The remaining tail of fewer than T+1 tokens is dropped.

Order. grain shuffles the sequence ids globally with `seed` (a different permutation every epoch),
repeats for `num_epochs` (None: forever), and groups them into global batches of `global_batch_size`
ids. Process p of P takes rows [p*B/P, (p+1)*B/P) of each global batch, so the processes' rows are
disjoint and stacked in process order they are exactly the single-process global batch.

Batch: `{"inputs": int32[B/P, T], "targets": int32[B/P, T]}`. The iterator's `get_state()` is a small
JSON-serialisable dict (`{"next_index": k}`); see `make_train_iter` for checkpointing with orbax.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import os
import sysconfig
from collections.abc import Sequence

import grain
import numpy as np

BYTE_VOCAB_SIZE = 256
DOC_SEPARATOR = 0  # byte 0: absent from source text, marks document boundaries
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_MAX_SHUFFLE_SEED = 2**32 - 1  # grain's shuffle seed range


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to read and how to batch it (MaxText names where MaxText has one).

    data: None = the standard library's `.py` files; else a glob (quote it on the command line) of
        text files, or of `.npy` 1-D integer token arrays (all matches must be `.npy` then).
    max_target_length: T, tokens per row of `inputs`/`targets`.
    global_batch_size: B, rows per step summed over all processes (each gets B / process_count).
    seed: shuffle seed (document order and per-epoch sequence order), 0 <= seed < 2**32.
    val_fraction: fraction of files held out for validation (by a hash of their relative path).
    vocab_size: token ids must be < vocab_size (256 for bytes).
    shuffle: shuffle documents and sequences; False reads the training stream in order.
    num_epochs: passes over the training sequences; None repeats forever.
    num_threads, prefetch_buffer_size: grain ReadOptions of the train iterator (batches are cheap
        numpy slices of an in-memory buffer, so a couple of threads and a small buffer suffice).
    """

    data: str | None = None
    max_target_length: int = 256
    global_batch_size: int = 8
    seed: int = 0
    val_fraction: float = 0.02
    vocab_size: int = BYTE_VOCAB_SIZE
    shuffle: bool = True
    num_epochs: int | None = None
    num_threads: int = 2
    prefetch_buffer_size: int = 8

    def __post_init__(self):
        if self.max_target_length < 1:
            raise ValueError(f"max_target_length must be >= 1, got {self.max_target_length}.")
        if self.global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {self.global_batch_size}.")
        if not 0 <= self.seed <= _MAX_SHUFFLE_SEED:
            raise ValueError(f"seed must be in [0, 2**32 - 1] (grain's shuffle seed), got {self.seed}.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}.")
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}.")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs must be None (forever) or >= 1, got {self.num_epochs}.")
        if self.num_threads < 0 or self.prefetch_buffer_size < 0:
            raise ValueError("num_threads and prefetch_buffer_size must be >= 0.")


class TokenStream:
    """A read-only concatenation of 1-D token arrays (in-memory or memory-mapped), random access."""

    def __init__(self, segments: Sequence[np.ndarray]):
        self.segments = [s for s in segments if len(s)]
        lengths = np.array([len(s) for s in self.segments], dtype=np.int64)
        # starts[k] = offset of segment k in the stream; starts[-1] = total length.
        self.starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream as int32 (gathered across segments)."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"window [{start}, {start + length}) outside a stream of {len(self)} tokens")
        out = np.empty(length, dtype=np.int32)
        filled = 0
        seg = int(np.searchsorted(self.starts, start, side="right")) - 1
        while filled < length:
            offset = start + filled - int(self.starts[seg])
            piece = self.segments[seg][offset : offset + length - filled]
            out[filled : filled + len(piece)] = piece
            filled += len(piece)
            seg += 1
        return out


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The two token streams and where they came from (paths relative to `root`)."""

    kind: str  # "bytes" or "tokens"
    root: str
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]
    train: TokenStream
    val: TokenStream


def stdlib_files() -> tuple[str, list[str]]:
    """(root, sorted relative paths) of the standard library's `.py` files (see the module doc)."""
    root = sysconfig.get_paths()["stdlib"]
    rel_paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        rel_dir = os.path.relpath(dirpath, root)
        rel_paths += [os.path.normpath(os.path.join(rel_dir, f)) for f in filenames if f.endswith(".py")]
    return root, sorted(rel_paths)


def glob_files(pattern: str) -> tuple[str, list[str]]:
    """(root, sorted relative paths) of the regular files matching `pattern` (`**` recurses)."""
    paths = sorted(os.path.abspath(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True))
    paths = [p for p in paths if os.path.isfile(p)]
    if not paths:
        raise ValueError(
            f"data glob {pattern!r} matched no files. Check the path, and quote the glob on the command "
            f"line so the shell does not expand it (e.g. --data 'corpus/*.txt')."
        )
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    return root, [os.path.relpath(p, root) for p in paths]


def path_hash_fraction(rel_path: str) -> float:
    """u = first 8 bytes of sha256(posix path) / 2**64 in [0, 1): a machine-independent coin."""
    digest = hashlib.sha256(rel_path.replace(os.sep, "/").encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_files(rel_paths: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, val): val holds the files whose hash fraction is < val_fraction (>= 1 file per side)."""
    fractions = {p: path_hash_fraction(p) for p in rel_paths}
    val = [p for p in rel_paths if fractions[p] < val_fraction]
    train = [p for p in rel_paths if fractions[p] >= val_fraction]
    if val_fraction > 0 and len(rel_paths) >= 2:
        # Small corpora: keep both sides non-empty, still chosen by hash (no dependence on order).
        if not val:
            moved = min(train, key=fractions.__getitem__)
            train.remove(moved)
            val = [moved]
        if not train:
            moved = max(val, key=fractions.__getitem__)
            val.remove(moved)
            train = [moved]
    return train, val


def _read_text_document(path: str) -> np.ndarray:
    data = np.fromfile(path, dtype=np.uint8)
    if np.any(data == DOC_SEPARATOR):
        raise ValueError(
            f"{path} contains byte 0, which the byte tokenizer reserves as the document separator. "
            f"Pass only text files, or convert the data to .npy token arrays."
        )
    return data


def _read_token_array(path: str, vocab_size: int) -> np.ndarray:
    tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        got = f"{tokens.dtype}{list(tokens.shape)}"
        raise ValueError(f"{path}: expected a 1-D integer token array, got {got}.")
    if len(tokens):
        min_id, max_id = int(tokens.min()), int(tokens.max())
        if min_id < 0 or max_id >= vocab_size:
            raise ValueError(
                f"{path}: token ids must lie in [0, vocab_size={vocab_size}), found min {min_id}, "
                f"max {max_id}. Raise vocab_size to at least {max_id + 1} or re-tokenize."
            )
    return tokens


def _document_order(rel_paths: Sequence[str], seed: int, shuffle: bool) -> list[str]:
    if not shuffle:
        return list(rel_paths)
    order = np.random.default_rng(seed).permutation(len(rel_paths))
    return [rel_paths[i] for i in order]


def _byte_stream(root: str, rel_paths: Sequence[str]) -> TokenStream:
    # One contiguous uint8 buffer: doc_0 0 doc_1 0 ... doc_n 0 (cheap slicing later).
    separator = np.array([DOC_SEPARATOR], dtype=np.uint8)
    pieces = []
    for rel in rel_paths:
        pieces += [_read_text_document(os.path.join(root, rel)), separator]
    return TokenStream([np.concatenate(pieces)] if pieces else [])


def _token_stream(root: str, rel_paths: Sequence[str], vocab_size: int) -> TokenStream:
    return TokenStream([_read_token_array(os.path.join(root, rel), vocab_size) for rel in rel_paths])


def _split_tail(stream: TokenStream, val_fraction: float) -> tuple[TokenStream, TokenStream]:
    """One-file corpus: the last ceil(val_fraction * n) tokens become the validation stream."""
    num_val = int(np.ceil(val_fraction * len(stream)))
    cut = len(stream) - num_val
    whole = stream.window(0, len(stream)) if len(stream) else np.zeros(0, np.int32)
    return TokenStream([whole[:cut]]), TokenStream([whole[cut:]])


def _file_fingerprint(root: str, rel_paths: Sequence[str]) -> tuple:
    stats = [os.stat(os.path.join(root, rel)) for rel in rel_paths]
    return tuple((rel, s.st_size, s.st_mtime_ns) for rel, s in zip(rel_paths, stats, strict=True))


def load_corpus(cfg: DataConfig) -> Corpus:
    """Resolves `cfg.data`, splits files into train/val and reads both token streams (cached)."""
    root, rel_paths = stdlib_files() if cfg.data is None else glob_files(cfg.data)
    is_npy = [p.endswith(".npy") for p in rel_paths]
    if any(is_npy) and not all(is_npy):
        raise ValueError(f"data glob {cfg.data!r} mixes .npy token arrays and text files; pick one kind.")
    kind = "tokens" if all(is_npy) else "bytes"
    if kind == "bytes" and cfg.vocab_size < BYTE_VOCAB_SIZE:
        raise ValueError(f"byte-level text needs vocab_size >= 256, got {cfg.vocab_size}.")
    fingerprint = _file_fingerprint(root, rel_paths)
    return _load_corpus_cached(
        kind, root, fingerprint, cfg.val_fraction, cfg.vocab_size, cfg.seed, cfg.shuffle
    )


@functools.lru_cache(maxsize=4)
def _load_corpus_cached(
    kind: str, root: str, fingerprint: tuple, val_fraction: float, vocab_size: int, seed: int, shuffle: bool
) -> Corpus:
    rel_paths = [entry[0] for entry in fingerprint]

    def read(paths: Sequence[str]) -> TokenStream:
        return _byte_stream(root, paths) if kind == "bytes" else _token_stream(root, paths, vocab_size)

    if len(rel_paths) == 1:
        train, val = _split_tail(read(rel_paths), val_fraction)
        return Corpus(kind, root, tuple(rel_paths), tuple(rel_paths) if len(val) else (), train, val)
    train_files, val_files = split_files(rel_paths, val_fraction)
    # Validation documents stay in sorted order, so its batches do not depend on the seed.
    train = read(_document_order(train_files, seed, shuffle))
    return Corpus(kind, root, tuple(train_files), tuple(val_files), train, read(val_files))


def num_sequences(stream: TokenStream, max_target_length: int) -> int:
    """Windows of T+1 tokens at stride T that fit in the stream: floor((n - 1) / T)."""
    return max(len(stream) - 1, 0) // max_target_length


def _process_rows(global_batch_size: int, process_index: int, process_count: int) -> slice:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index} of {process_count}.")
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by process_count={process_count}; "
            f"choose a multiple of {process_count}."
        )
    rows = global_batch_size // process_count
    return slice(process_index * rows, (process_index + 1) * rows)


def _gather_batch(sequence_ids: np.ndarray, stream: TokenStream, max_target_length: int) -> dict:
    """Rows of T+1 tokens at offsets id*T -> {"inputs": w[:, :-1], "targets": w[:, 1:]} (int32)."""
    length = max_target_length + 1
    windows = np.stack([stream.window(int(i) * max_target_length, length) for i in sequence_ids])
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


def _check_fits(stream: TokenStream, cfg: DataConfig, split: str) -> int:
    count = num_sequences(stream, cfg.max_target_length)
    if count == 0:
        raise ValueError(
            f"the {split} split has {len(stream)} tokens, fewer than max_target_length + 1 = "
            f"{cfg.max_target_length + 1}; lower max_target_length or use more data"
            + (" (or raise val_fraction)." if split == "validation" else ".")
        )
    return count


def make_train_iter(
    cfg: DataConfig, *, process_index: int = 0, process_count: int = 1
) -> grain.DatasetIterator:
    """Iterator of this process's share of each global training batch (see the module doc).

    Resume: `state = it.get_state()` is a JSON-serialisable dict; `make_train_iter(cfg, ...)` then
    `it.set_state(state)` continues with exactly the batch the saved iterator would have produced.
    With orbax: `grain.checkpoint.CheckpointSave(it)` / `grain.checkpoint.CheckpointRestore(it)` inside
    `ocp.args.Composite(...)` (one JSON file per process), or `ocp.args.JsonSave(it.get_state())`.
    """
    rows = _process_rows(cfg.global_batch_size, process_index, process_count)
    corpus = load_corpus(cfg)
    count = _check_fits(corpus.train, cfg, "training")
    ids = grain.MapDataset.range(count)
    if cfg.shuffle:
        ids = ids.shuffle(seed=cfg.seed)  # a fresh permutation each epoch (seed folded with the epoch)
    ids = ids.repeat(cfg.num_epochs).batch(cfg.global_batch_size, drop_remainder=True)
    if cfg.num_epochs is not None and len(ids) == 0:
        raise ValueError(
            f"{count} training sequences x {cfg.num_epochs} epochs is less than one global batch of "
            f"{cfg.global_batch_size}; lower global_batch_size or raise num_epochs."
        )
    batches = ids.map(lambda global_ids: _gather_batch(global_ids[rows], corpus.train, cfg.max_target_length))
    options = grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch_buffer_size)
    return iter(batches.to_iter_dataset(options))


def make_val_batches(
    cfg: DataConfig, num_batches: int, *, process_index: int = 0, process_count: int = 1
) -> list[dict]:
    """A fixed list of `num_batches` held-out batches: validation sequences 0, 1, 2, ... in order.

    No shuffle and independent of `seed` and of training progress. If the split holds fewer than
    num_batches * global_batch_size sequences, it wraps around (sequence i is i mod count).
    """
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}.")
    rows = _process_rows(cfg.global_batch_size, process_index, process_count)
    corpus = load_corpus(cfg)
    if cfg.val_fraction == 0 or len(corpus.val) == 0:
        raise ValueError("no validation split: val_fraction is 0 (or the corpus is too small to hold out).")
    count = _check_fits(corpus.val, cfg, "validation")
    batches = (
        grain.MapDataset.range(num_batches * cfg.global_batch_size)
        .map(lambda i: i % count)
        .batch(cfg.global_batch_size, drop_remainder=True)
        .map(lambda global_ids: _gather_batch(global_ids[rows], corpus.val, cfg.max_target_length))
    )
    return [batches[i] for i in range(len(batches))]

"""Data pipeline: packing against a plain-Python reference, determinism, split, resume, sharding."""

import hashlib
import json
import os

import grain
import numpy as np
import pytest

from lowbit import data

T = 32  # small windows keep every test fast


def ref_hash_fraction(rel_path):
    return int(hashlib.sha256(rel_path.encode()).hexdigest()[:16], 16) / 2**64


def ref_windows(stream_bytes, count, length):
    """Sequence i = stream[i*length : i*length + length + 1] (concat-and-chunk, stride T)."""
    return [np.frombuffer(stream_bytes[i * length : i * length + length + 1], np.uint8) for i in range(count)]


def write_texts(directory, texts):
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (directory / name).write_bytes(text.encode())
    return str(directory / "*.txt")


TEXTS = {
    f"doc{k}.txt": f"# document {k}\n"
    + "".join(f"def f{k}_{j}(x):\n    return x * {j} + {k}\n" for j in range(k + 4))
    for k in range(8)
}


def next_batches(iterator, count):
    return [next(iterator) for _ in range(count)]


def assert_batches_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g["inputs"], w["inputs"])
        np.testing.assert_array_equal(g["targets"], w["targets"])


# ---------------------------------------------------------------- default corpus


def test_default_corpus_batches_are_shifted_bytes():
    cfg = data.DataConfig(max_target_length=T, global_batch_size=8)
    batches = next_batches(data.make_train_iter(cfg), 3)
    for batch in batches:
        assert set(batch) == {"inputs", "targets"}
        for value in batch.values():
            assert value.shape == (8, T) and value.dtype == np.int32
            assert value.min() >= 0 and value.max() < 256
        # targets are the inputs shifted by one token within each packed sequence
        np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
    # the rows are real Python source: mostly printable ASCII
    tokens = np.concatenate([b["inputs"].ravel() for b in batches])
    printable = (tokens >= 32) & (tokens < 127) | (tokens == 10)
    assert printable.mean() > 0.9


def test_default_corpus_is_stdlib_python_split_by_path_hash():
    corpus = data.load_corpus(data.DataConfig())
    train, val = set(corpus.train_files), set(corpus.val_files)
    assert not train & val
    assert len(train) > 300 and 0 < len(val) < 0.05 * len(train)
    for rel in train | val:
        assert rel.endswith(".py") and "site-packages" not in rel.split(os.sep)
    for rel in val:
        assert ref_hash_fraction(rel.replace(os.sep, "/")) < 0.02
    # every byte of a file plus one separator per file
    sizes = {rel: os.path.getsize(os.path.join(corpus.root, rel)) for rel in train | val}
    assert len(corpus.train) == sum(sizes[r] for r in train) + len(train)
    assert len(corpus.val) == sum(sizes[r] for r in val) + len(val)


def test_same_seed_same_batches_other_seed_other_order():
    def first(seed):
        cfg = data.DataConfig(max_target_length=T, global_batch_size=4, seed=seed)
        return next_batches(data.make_train_iter(cfg), 3)

    assert_batches_equal(first(1), first(1))
    assert not np.array_equal(first(1)[0]["inputs"], first(2)[0]["inputs"])


# ---------------------------------------------------------------- text and token files


def test_text_glob_packs_like_plain_python_reference(tmp_path):
    pattern = write_texts(tmp_path / "corpus", TEXTS)
    names = sorted(TEXTS)
    ref_val = [n for n in names if ref_hash_fraction(n) < 0.3]
    ref_train = [n for n in names if ref_hash_fraction(n) >= 0.3]
    assert ref_val and ref_train  # precondition: the hash split is non-trivial for these names
    cfg = data.DataConfig(
        data=pattern, max_target_length=T, global_batch_size=4, val_fraction=0.3, shuffle=False
    )
    corpus = data.load_corpus(cfg)
    assert list(corpus.train_files) == ref_train and list(corpus.val_files) == ref_val

    stream = b"".join(TEXTS[n].encode() + b"\0" for n in ref_train)
    count = (len(stream) - 1) // T
    windows = ref_windows(stream, count, T)
    batches = next_batches(data.make_train_iter(cfg), count // 4)
    for step, batch in enumerate(batches):
        for row in range(4):
            window = windows[step * 4 + row]
            np.testing.assert_array_equal(batch["inputs"][row], window[:-1])
            np.testing.assert_array_equal(batch["targets"][row], window[1:])
    # windows that span a document boundary carry the 0 separator
    assert any(0 in b["inputs"] for b in batches)


def test_each_epoch_visits_every_window_once_in_a_new_order(tmp_path):
    pattern = write_texts(tmp_path / "corpus", TEXTS)
    cfg = data.DataConfig(
        data=pattern, max_target_length=T, global_batch_size=1, val_fraction=0.3, num_epochs=2
    )
    train_names = [n for n in sorted(TEXTS) if ref_hash_fraction(n) >= 0.3]
    train_bytes = b"".join(TEXTS[n].encode() + b"\0" for n in train_names)
    count = (len(train_bytes) - 1) // T
    rows = [tuple(b["inputs"][0]) for b in data.make_train_iter(cfg)]
    assert len(rows) == 2 * count  # finite num_epochs ends the iterator
    first, second = rows[:count], rows[count:]
    assert len(set(first)) == count and set(first) == set(second) and first != second
    # the inputs of one epoch tile the first count*T tokens of the (seed-ordered) training stream
    epoch_hist = np.bincount(np.concatenate(first), minlength=256)
    corpus_hist = np.bincount(np.frombuffer(train_bytes, np.uint8), minlength=256)
    assert np.all(epoch_hist <= corpus_hist) and epoch_hist.sum() == count * T


def test_npy_tokens_used_as_is(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 1000, size=n).astype(np.int32) for n in (300, 500)]
    for k, tokens in enumerate(arrays):
        np.save(tmp_path / f"part{k}.npy", tokens.astype(np.uint16 if k else np.int64))
    cfg = data.DataConfig(
        data=str(tmp_path / "*.npy"),
        max_target_length=T,
        global_batch_size=2,
        vocab_size=1000,
        val_fraction=0.0,
        shuffle=False,
    )
    stream = np.concatenate(arrays)  # no separator between token arrays
    batches = next_batches(data.make_train_iter(cfg), 5)
    for step, batch in enumerate(batches):
        for row in range(2):
            start = (step * 2 + row) * T
            np.testing.assert_array_equal(batch["inputs"][row], stream[start : start + T])
            np.testing.assert_array_equal(batch["targets"][row], stream[start + 1 : start + T + 1])
    # a window that straddles the two arrays (offset 288..320 crosses 300)
    np.testing.assert_array_equal(data.TokenStream(arrays).window(290, 20), stream[290:310])


def test_npy_out_of_vocab_is_an_error_naming_file_and_max(tmp_path):
    np.save(tmp_path / "ok.npy", np.arange(100))
    np.save(tmp_path / "bad.npy", np.array([1, 2, 70000, 3]))
    cfg = data.DataConfig(data=str(tmp_path / "*.npy"), vocab_size=50000, max_target_length=2)
    with pytest.raises(ValueError, match=r"bad\.npy.*max 70000"):
        data.make_train_iter(cfg)


# ---------------------------------------------------------------- resume and checkpointing


@pytest.mark.parametrize("source", ["stdlib", "small"])
def test_resume_from_state_matches_uninterrupted(tmp_path, source):
    pattern = None if source == "stdlib" else write_texts(tmp_path / "corpus", TEXTS)
    # "small": 15 windows of 128 per epoch, so 10 steps of 2 rows cross an epoch boundary
    cfg = data.DataConfig(
        data=pattern,
        max_target_length=T if pattern is None else 128,
        global_batch_size=4 if pattern is None else 2,
        seed=3,
    )
    uninterrupted = data.make_train_iter(cfg)
    next_batches(uninterrupted, 7)
    state = json.loads(json.dumps(uninterrupted.get_state()))  # JSON-serialisable
    want = next_batches(uninterrupted, 3)

    resumed = data.make_train_iter(cfg)
    resumed.set_state(state)
    assert_batches_equal(next_batches(resumed, 3), want)


def test_orbax_checkpoint_manager_saves_and_restores_iterator(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    cfg = data.DataConfig(max_target_length=T, global_batch_size=4, seed=5)
    iterator = data.make_train_iter(cfg)
    next_batches(iterator, 7)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(7, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
    want = next_batches(iterator, 3)

    fresh = data.make_train_iter(cfg)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        restored = manager.restore(
            7, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh))
        )
    assert restored.data_iter is fresh
    assert_batches_equal(next_batches(fresh, 3), want)


# ---------------------------------------------------------------- multi-host sharding


def test_process_shards_are_disjoint_rows_of_the_global_batch():
    cfg = data.DataConfig(max_target_length=T, global_batch_size=8, seed=11)
    global_batches = next_batches(data.make_train_iter(cfg), 3)
    shards = [next_batches(data.make_train_iter(cfg, process_index=p, process_count=4), 3) for p in range(4)]
    for step in range(3):
        for key in ("inputs", "targets"):
            parts = [shards[p][step][key] for p in range(4)]
            assert all(part.shape == (2, T) for part in parts)
            np.testing.assert_array_equal(np.concatenate(parts), global_batches[step][key])
        rows = [tuple(r) for p in range(4) for r in shards[p][step]["inputs"]]
        assert len(set(rows)) == 8


# ---------------------------------------------------------------- validation


def test_val_batches_fixed_held_out_and_seed_independent(tmp_path):
    pattern = write_texts(tmp_path / "corpus", TEXTS)
    cfg = data.DataConfig(data=pattern, max_target_length=T, global_batch_size=4, val_fraction=0.3)
    val_names = [n for n in sorted(TEXTS) if ref_hash_fraction(n) < 0.3]
    stream = b"".join(TEXTS[n].encode() + b"\0" for n in val_names)
    count = (len(stream) - 1) // T
    windows = ref_windows(stream, count, T)
    num_batches = count // 4 + 2  # more than the split holds: wraps around
    batches = data.make_val_batches(cfg, num_batches)
    assert len(batches) == num_batches
    for step, batch in enumerate(batches):
        for row in range(4):
            np.testing.assert_array_equal(batch["inputs"][row], windows[(step * 4 + row) % count][:-1])
    other_seed = data.make_val_batches(data.DataConfig(**{**cfg.__dict__, "seed": 9}), num_batches)
    assert_batches_equal(other_seed, batches)
    halves = [data.make_val_batches(cfg, 2, process_index=p, process_count=2) for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([h[1]["inputs"] for h in halves]), batches[1]["inputs"])


def test_single_file_holds_out_its_tail(tmp_path):
    text = "".join(f"line {k}\n" for k in range(400))
    (tmp_path / "one.txt").write_text(text)
    cfg = data.DataConfig(data=str(tmp_path / "one.txt"), max_target_length=T, val_fraction=0.1)
    corpus = data.load_corpus(cfg)
    stream = np.frombuffer(text.encode() + b"\0", np.uint8)
    num_val = int(np.ceil(0.1 * len(stream)))
    np.testing.assert_array_equal(corpus.val.window(0, len(corpus.val)), stream[-num_val:])
    np.testing.assert_array_equal(corpus.train.window(0, len(corpus.train)), stream[:-num_val])


# ---------------------------------------------------------------- errors


def test_glob_matching_nothing_names_the_glob(tmp_path):
    pattern = str(tmp_path / "nothing" / "*.txt")
    with pytest.raises(ValueError, match="matched no files") as info:
        data.make_train_iter(data.DataConfig(data=pattern))
    assert pattern in str(info.value)


def test_sequence_longer_than_corpus(tmp_path):
    pattern = write_texts(tmp_path / "corpus", {"a.txt": "tiny", "b.txt": "text"})
    with pytest.raises(ValueError, match="max_target_length"):
        data.make_train_iter(data.DataConfig(data=pattern, max_target_length=1000, val_fraction=0.0))


def test_batch_not_divisible_by_process_count():
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        data.make_train_iter(data.DataConfig(global_batch_size=8), process_index=0, process_count=3)


def test_text_with_nul_byte_is_rejected(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"abc\0def" * 10)
    with pytest.raises(ValueError, match=r"bin\.txt contains byte 0"):
        data.load_corpus(data.DataConfig(data=str(tmp_path / "*.txt")))


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_target_length", 0),
        ("global_batch_size", 0),
        ("val_fraction", 1.0),
        ("seed", -1),
        ("num_epochs", 0),
    ],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        data.DataConfig(**{field: value})

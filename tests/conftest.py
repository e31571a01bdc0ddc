"""Test-session set-up: 8 simulated CPU devices (for sharding tests) before jax is imported, one
compilation cache for the session, and the order in which `pytest -n 2 --dist loadfile` hands test
files to its workers."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# jax's persistent compilation cache in a directory that lives as long as this pytest session: the
# first process to import this file (the xdist controller) makes it, and the workers and every child
# process a test starts (lowbit.study --jobs, tools/*.py, notebook kernels) inherit it through the
# environment. Within one process jax's in-memory cache already reuses a program; this one saves the
# compiles that other processes repeat (jax writes entries that took >= 1 s, its default threshold).
# Numerics cannot change: the key is the optimized program, jax and XLA flags, and the device.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="lowbit-test-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)

# Longest files first (CPU seconds measured on 2 cores), so that neither worker is left with a long
# file at the end; files not listed follow in collection order. Each worker needs the same order.
LONGEST_FIRST = ["test_train.py", "test_notebooks.py", "test_quantize.py", "test_model.py",
                 "test_scan_layers.py", "test_dot.py", "test_bench_gemm.py", "test_quantize_pallas.py",
                 "test_dot_fused.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: keeps order in a file

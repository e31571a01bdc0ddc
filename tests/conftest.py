"""Test-session set-up: 8 simulated CPU devices (for sharding tests) before jax is imported, and
the order in which `pytest -n 2 --dist loadfile` hands test files to its workers."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Longest files first (CPU seconds measured on 2 cores), so that neither worker is left with a long
# file at the end; files not listed follow in collection order. Each worker needs the same order.
LONGEST_FIRST = ["test_train.py", "test_notebooks.py", "test_quantize.py", "test_model.py",
                 "test_scan_layers.py", "test_dot.py", "test_bench_gemm.py", "test_quantize_pallas.py",
                 "test_dot_fused.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: keeps order in a file

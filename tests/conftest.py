import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cluster import Cluster  # noqa: E402

if not torch.cuda.is_available():  # Triton kernels (where triton is installed) run in its interpreter here;
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton is imported, so before any test does

# under pytest-xdist (make test: -n 2) each worker takes its share of the cores
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))

_clusters: dict[int, Cluster] = {}


@pytest.fixture(scope="session")
def cluster():
    """``cluster(n)``: a live pool of ``n`` gloo processes, shared by the session's tests."""

    def get(n: int) -> Cluster:
        if n in _clusters and not all(p.is_alive() for p in _clusters[n].procs):
            _clusters.pop(n).close(force=True)  # killed after a timeout: start a fresh pool
        if n not in _clusters:
            _clusters[n] = Cluster(n)
        return _clusters[n]

    yield get
    for c in _clusters.values():
        c.close()
    _clusters.clear()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA; run tools/run_gpu_tests.sh on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

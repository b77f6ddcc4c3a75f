import os

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# scripts/test.sh runs the suite in two pytest-xdist workers, one per core: one thread each
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def programs():
    """The reference model's inference programs (step and prefill), shared by the TensorRT tests."""
    from mla_fx.inference import build_programs
    from mla_fx.loading import load_model

    return build_programs(load_model("zoo:reference"))

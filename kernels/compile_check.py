"""Compile a Triton kernel for an NVIDIA GPU on a machine without one, and read what ptxas says
about it (registers per thread, spill bytes, stack frame): the checks a GPU engineer makes first,
run in the CPU test suite so a kernel that spills or fails to lower is caught before it reaches a
card."""
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass
class PtxasReport:
    target: str  # e.g. sm_90a
    registers: int  # per thread
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    stack: int  # stack frame bytes
    shared: int  # static shared memory bytes (Triton's dynamic shared memory: CompiledKernel.metadata.shared)
    ptx: str


def compile_for(fn, signature: dict, constexprs: dict, cc: int, num_warps: int = 4, num_stages: int = 3,
                divisible_by_16: tuple[str, ...] = ()):
    """triton.compile for compute capability cc (80 = A100, 90 = H100) without a driver.

    divisible_by_16: arguments to compile as the launcher specialises them when a pointer is
    16-byte aligned or an integer a multiple of 16 (what lets loads vectorise)."""
    import triton
    from triton.backends.compiler import GPUTarget

    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible_by_16}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": num_warps, "num_stages": num_stages})


def ptxas_report(ptx: str) -> PtxasReport:
    """Assemble PTX with `ptxas -v` and parse its resource line, using the ptxas Triton itself
    picks for the arch (it reads the PTX version Triton emits; a CUDA 13.0 toolkit's does not).
    Raises RuntimeError naming the tool when it fails."""
    from triton.backends.nvidia.compiler import get_ptxas

    target = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
    exe = get_ptxas(int(re.match(r"sm_(\d+)", target).group(1))).path
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        out = subprocess.run([exe, "-v", f"--gpu-name={target}", str(path), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{exe} failed on {target}:\n{out.stderr[-2000:]}")
    log = out.stderr

    def grab(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    return PtxasReport(target=target, registers=grab(r"Used (\d+) registers"), spill_stores=grab(r"(\d+) bytes spill stores"),
                       spill_loads=grab(r"(\d+) bytes spill loads"), stack=grab(r"(\d+) bytes stack frame"),
                       shared=grab(r"(\d+) bytes smem"), ptx=ptx)

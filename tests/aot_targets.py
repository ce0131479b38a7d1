"""The ahead-of-time compile targets, one or more per device family, and what a compile reports for each.

``TARGETS`` names every target the kernels are compiled for on a CPU (Triton's ``GPUTarget``: CUDA by compute
capability, HIP by gfx architecture), each standing for its family (``kernels/_common.py``'s ``TARGET_FAMILY``):
its shared memory (LDS) limit and the matrix instruction a ``tl.dot`` must compile to come from there.
``build`` compiles one kernel for one target and reports: the shared memory (``metadata.shared``), registers and
spills (NVIDIA: ``ptxas -v``, the ptxas Triton ships, on the PTX, in bytes; AMD: the amdgcn metadata's
``.vgpr_count``, and ``.vgpr_spill_count`` plus ``.sgpr_spill_count``, in registers), whether the family's matrix
instruction is in the code, and the Hopper-schedule facts (TMA copies, a persistent loop, warp specialization).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

# Target -> (Triton backend, architecture, threads per warp or wavefront). sm_80 and sm_90 are compiled in every
# case in CI; the others in a representative set (aot_compile.representative) unless AOT_TARGETS says otherwise.
TARGETS = {
    "sm_80": ("cuda", 80, 32),
    "sm_86": ("cuda", 86, 32),
    "sm_89": ("cuda", 89, 32),
    "sm_90": ("cuda", 90, 32),
    "sm_100": ("cuda", 100, 32),
    "sm_103": ("cuda", 103, 32),
    "sm_120": ("cuda", 120, 32),
    "sm_121": ("cuda", 121, 32),
    "gfx90a": ("hip", "gfx90a", 64),
    "gfx942": ("hip", "gfx942", 64),
    "gfx950": ("hip", "gfx950", 64),
    "sm_75": ("cuda", 75, 32),  # a GPU of no known family (``_common.OTHER``): its small tiles, no matrix instruction
}
EVERY_CASE_IN_CI = ("sm_80", "sm_90")
# The text each family's matrix instruction shows in the compiled code (PTX or amdgcn).
MMA_TEXT = {"mma.sync": "mma.sync", "wgmma": "wgmma.mma_async", "tcgen05": "tcgen05.mma", "v_mfma": "v_mfma"}


def family(target: str):
    from fused_residual.kernels import _common

    return _common.TARGET_FAMILY.get(target, _common.OTHER)


def is_hip(target: str) -> bool:
    return TARGETS[target][0] == "hip"


def build(target: str, kernel, signature: dict, constexprs: dict, attrs: dict, options: dict) -> dict:
    """Compile ``kernel`` for ``target`` and report what it needs (module docstring); ``ok`` False with the error
    where it does not compile."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    backend, arch, warp_size = TARGETS[target]
    try:
        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget(backend, arch, warp_size), options=options)
    except Exception as err:  # recorded, and the test fails on it
        return {"ok": False, "error": f"{type(err).__name__}: {str(err)[:2000]}"}
    ttgir = compiled.asm.get("ttgir", "")
    code = compiled.asm["amdgcn"] if backend == "hip" else compiled.asm["ptx"]
    mma = family(target).mma
    report = {"ok": True, "shared": compiled.metadata.shared, "mma": bool(mma) and MMA_TEXT[mma] in code,
              "mma_sync": MMA_TEXT["mma.sync"] in code,
              "tma": "cp.async.bulk.tensor" in code, "persistent": "tt.get_num_programs" in ttgir,
              "warp_specialized": "ttg.warp_specialize" in ttgir and "setmaxnreg" in code}
    report.update(_amdgcn_report(code) if backend == "hip" else _ptxas_report(code, arch))
    return report


def _amdgcn_report(code: str) -> dict:
    """VGPRs and spills (VGPRs plus SGPRs spilled) from the amdgcn metadata."""

    def field(name: str) -> int | None:
        found = re.search(rf"\.{name}:\s+(\d+)", code)
        return int(found.group(1)) if found else None

    vgpr_spills, sgpr_spills = field("vgpr_spill_count"), field("sgpr_spill_count")
    spills = None if vgpr_spills is None or sgpr_spills is None else vgpr_spills + sgpr_spills
    return {"ptxas_ok": True, "registers": field("vgpr_count"), "agprs": field("agpr_count"), "spills": spills,
            "spill_unit": f"registers ({vgpr_spills} VGPRs, {sgpr_spills} SGPRs)", "ptxas_log": ""}


def _ptxas_report(ptx: str, cap: int) -> dict:
    """Registers and spill bytes from ``ptxas -v`` on the kernel's PTX."""
    from triton.backends.nvidia import compiler

    try:
        ptxas = compiler.get_ptxas(cap).path  # triton >= 3.5 picks the ptxas per architecture
    except TypeError:
        ptxas = compiler.get_ptxas().path
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, "-v", f"--gpu-name={compiler.sm_arch_from_capability(cap)}", path, "-o",
                               path + ".o"], capture_output=True, text=True)
    log = proc.stderr + proc.stdout
    regs = re.search(r"Used (\d+) registers", log)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    return {"ptxas_ok": proc.returncode == 0, "registers": int(regs.group(1)) if regs else None,
            "spills": sum(spills) if spills else None, "spill_unit": "bytes", "ptxas_log": log[-600:]}

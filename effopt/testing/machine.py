"""What machine a benchmark measured: the CPU, the ISA effopt generates kernels for, torch's ISA, and
whether a lower ISA was emulated (EFFOPT_HOST_ISA, EFFOPT_HOST_CPU, ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA).
Everything about the CPU comes from effopt.host."""
from __future__ import annotations

import os

from ..host import host, make_host, read_cpuinfo

EMULATION_VARIABLES = ("EFFOPT_HOST_ISA", "EFFOPT_HOST_CPU", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")


def cpu_isa() -> str:
    """The best ISA level the CPU itself has, whatever the overrides say ("AVX-512 VNNI", "AVX2", ...)."""
    import platform

    name, vendor, flags = read_cpuinfo()
    return make_host(name, vendor, flags, platform.machine(), None, features=None).level


def describe() -> dict:
    """{"cpu", "cores", "cpu_isa", "isa" (what effopt's kernels and torch run here), "emulated", "line"}."""
    import torch

    h = host()
    real = cpu_isa()
    emulated = any(os.environ.get(v) for v in EMULATION_VARIABLES)
    isa = f"{h.level} (emulated on an {real} CPU)" if emulated else real
    line = (f"machine: {h.cpu} ({h.llvm_cpu}), {os.cpu_count()} cores; ISA {isa}; torch "
            f"{torch.__version__} ({torch.backends.cpu.get_cpu_capability()})")
    return {"cpu": h.cpu, "cores": os.cpu_count(), "cpu_isa": real, "isa": isa, "emulated": emulated,
            "llvm_cpu": h.llvm_cpu, "torch_isa": torch.backends.cpu.get_cpu_capability(), "line": line}

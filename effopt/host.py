"""What this CPU can do: the one description that every CPU-dependent choice and test reads.

    from effopt.host import host
    h = host()                  # cached for the process
    h.vector_unit               # "avx512" | "avx2" | "neon" | None: the float32 FMA unit kernels are tiled for
    h.int8_dot                  # "avx512vnni" | "avxvnni" | "avx2" | "neon-i8mm" | "neon-dot" | None: int8 kernel
    h.llvm_cpu                  # the LLVM CPU that effopt's 'host' target names
    h.missing("avx512_vnni")    # why this host cannot execute code that needs those flags, or None
    torch_int8_gemm()           # why torch._int_mm must not run int8 GEMMs here, or None

The features are read from the CPU itself (/proc/cpuinfo's flags, which the kernel fills from cpuid) and
cross-checked with LLVM's name for the CPU: a VM may call its CPU `znver4` yet hide AVX-512 from the guest,
and code built for the name would die on an illegal instruction. Where the name promises more than the flags,
the 'host' target names a CPU of the level the flags do have.

One override makes the package, and its tests, behave as a lower ISA: EFFOPT_HOST_ISA=avx2 (or avx512,
avx512vnni; "native" or unset: the CPU's own). Under it the flags above that level are dropped, 'host' is
built for a CPU of that level, torch's int8 GEMM counts as unusable where the level has no VNNI, and
`torch_environment()` gives the variables that limit torch's own kernels (oneDNN, ATen, MKL) to it, set in
this process at `import effopt` where not already set (they act only if set before torch's first kernel:
subprocesses and `make test-avx2` set them in the environment). EFFOPT_HOST_CPU names the LLVM CPU for 'host'
(e.g. znver3); the level is then what both that CPU and this one have.

This is emulation: it checks that the lower ISA's code runs and is right, not how fast it is there.
"""
from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass, field

ISA_OVERRIDE = "EFFOPT_HOST_ISA"
CPU_OVERRIDE = "EFFOPT_HOST_CPU"

# levels EFFOPT_HOST_ISA accepts: the /proc/cpuinfo flags the level needs, the ones above it that it drops
LEVELS = {
    "avx2": (("avx2", "fma"), ("avx512", "avx_vnni", "amx", "avx10")),
    "avx512": (("avx512f", "avx512bw"), ("avx512_vnni", "avx_vnni", "amx", "avx10")),
    "avx512vnni": (("avx512f", "avx512bw", "avx512_vnni"), ("amx",)),
}
# an LLVM CPU of each level, per vendor: what 'host' is built as where LLVM's name promises more than the
# flags (or the override) allow. Zen 3 for AMD AVX2 (as measured in shared/MEASUREMENTS.md), Haswell otherwise.
LEVEL_CPUS = {"avx2": {"AuthenticAMD": "znver3", "": "haswell"},
              "avx512": {"": "skylake-avx512"},
              "avx512vnni": {"AuthenticAMD": "znver4", "": "icelake-server"}}
# torch's own switches for a level (the same environment as the AVX2 emulation always used)
TORCH_ENV = {"avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
             "avx512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "ATEN_CPU_CAPABILITY": "avx512",
                        "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
             "avx512vnni": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI", "ATEN_CPU_CAPABILITY": "avx512",
                            "MKL_ENABLE_INSTRUCTIONS": "AVX512"}}
# LLVM feature names -> /proc/cpuinfo flag names, for the features a choice depends on
LLVM_FEATURES = {"avx2": "avx2", "fma": "fma", "avx512f": "avx512f", "avx512bw": "avx512bw",
                 "avx512vnni": "avx512_vnni", "avxvnni": "avx_vnni"}
# int8 dot products whose instruction makes torch's int8 GEMM (oneDNN) faster than its float32 GEMM
FAST_INT8 = ("avx512vnni", "avxvnni", "amx", "neon-i8mm", "neon-dot")
X86_ARCHES = ("x86_64", "AMD64", "i686", "i386")
NAMES = {"avx512vnni": "AVX-512 VNNI", "avxvnni": "AVX-VNNI", "avx512": "AVX-512", "avx2": "AVX2",
         "neon-i8mm": "NEON i8mm", "neon-dot": "NEON dotprod", "neon": "NEON"}


@dataclass(frozen=True)
class Host:
    cpu: str  # the CPU's model name
    arch: str  # platform.machine()
    vendor: str  # "AuthenticAMD", "GenuineIntel", ...
    flags: frozenset  # /proc/cpuinfo flags, less those above the override's level
    llvm_cpu: str  # what the 'host' target is built as
    override: str | None = None  # EFFOPT_HOST_ISA's level
    notes: tuple = field(default=())  # what the cross-check changed, for the report and `effopt inspect`

    def has(self, *flags: str) -> bool:
        return all(f in self.flags for f in flags)

    def missing(self, *flags: str) -> str | None:
        """Why this host cannot execute code that needs these /proc/cpuinfo flags, or None."""
        lacking = [f for f in flags if f not in self.flags]
        if not lacking:
            return None
        limited = f" (limited by {ISA_OVERRIDE}={self.override})" if self.override else ""
        return f"this CPU has no {', '.join(lacking)}{limited}"

    @property
    def x86(self) -> bool:
        return self.arch in X86_ARCHES

    @property
    def vector_unit(self) -> str | None:
        if not self.x86:
            return "neon" if self.has("asimd") or self.arch in ("aarch64", "arm64") else None
        if self.has("avx512f"):
            return "avx512"
        return "avx2" if self.has("avx2", "fma") else None

    @property
    def int8_dot(self) -> str | None:
        """The int8 dot product effopt's int8 kernel is generated for here."""
        if not self.x86:
            return "neon-i8mm" if self.has("i8mm") else "neon-dot" if self.has("asimddp") else None
        if self.has("avx512_vnni", "avx512bw"):
            return "avx512vnni"
        if self.has("avx_vnni", "avx2"):
            return "avxvnni"
        return "avx2" if self.has("avx2") else None

    @property
    def fast_int8(self) -> bool:
        """Whether the CPU has an int8 dot-product instruction (VNNI, AMX, NEON dotprod), which is what makes
        an int8 GEMM faster than a float32 one: without it (AVX2) int8 products widen through pmaddubsw and
        torch's int8 GEMM is a reference loop (3 GOPS on a Zen 3, against 70-150 GFLOPS in float32)."""
        return self.int8_dot in FAST_INT8 or self.has("amx_int8")

    @property
    def level(self) -> str:
        """The best level, by the names a table prints ("AVX-512 VNNI", "AVX2", ...)."""
        if self.x86:
            if self.has("avx512f", "avx512bw", "avx512_vnni"):
                return NAMES["avx512vnni"]
            if self.has("avx_vnni", "avx2"):
                return NAMES["avxvnni"]
            if self.has("avx512f"):
                return NAMES["avx512"]
            return NAMES["avx2"] if self.has("avx2", "fma") else self.arch
        return NAMES.get(self.int8_dot or "", self.arch)

    def describe(self) -> str:
        over = f", as {self.override} ({ISA_OVERRIDE})" if self.override else ""
        return f"{self.cpu} ({self.llvm_cpu}): {self.level}{over}"


def read_cpuinfo(path: str = "/proc/cpuinfo") -> tuple[str, str, set | None]:
    """(model name, vendor, flags) of the first CPU in /proc/cpuinfo (the kernel fills them from cpuid);
    flags None where there is no such file (not Linux): then LLVM's name is all there is to go on."""
    name, vendor, flags = platform.processor() or platform.machine(), "", set()
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and name in ("", platform.processor(), platform.machine()):
                    name = value.strip()
                elif key == "vendor_id" and not vendor:
                    vendor = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags.update(value.split())
    except OSError:
        return name, vendor, None
    return name, vendor, flags


def _level_cpu(level: str, vendor: str) -> str:
    cpus = LEVEL_CPUS[level]
    return cpus.get(vendor, cpus[""])


@functools.lru_cache(maxsize=None)
def llvm_features(cpu: str) -> dict[str, bool] | None:
    """Which of LLVM_FEATURES LLVM's CPU `cpu` implies (None: no LLVM here to ask)."""
    try:
        import tvm
        from tvm.target import codegen
    except ImportError:
        return None
    target = tvm.target.Target({"kind": "llvm", "mcpu": cpu})
    return {f: bool(codegen.target_has_features(f, target)) for f in LLVM_FEATURES}


def _system_cpu() -> str | None:
    try:
        from tvm.target import codegen
    except ImportError:
        return None
    return str(codegen.llvm_get_system_cpu())


def make_host(name: str, vendor: str, flags: set, arch: str, system_cpu: str | None, override: str | None = None,
              cpu_override: str | None = None, features=llvm_features) -> Host:
    """The description from its inputs (host() reads them from this machine): the override's level applied
    to the flags, then LLVM's CPU name cross-checked against them."""
    notes = []
    if flags is None:  # no /proc/cpuinfo: the flags LLVM's name implies, said in the notes
        promised = features(cpu_override or system_cpu) if features is not None and (cpu_override or system_cpu) \
            else None
        flags = {LLVM_FEATURES[f] for f, on in (promised or {}).items() if on}
        notes.append(f"no /proc/cpuinfo to read the CPU's flags from: trusting LLVM's name "
                     f"{cpu_override or system_cpu}")
    flags = set(flags)
    if override:
        if override not in LEVELS:
            raise ValueError(f"{ISA_OVERRIDE}={override!r} is not a level effopt knows; valid: "
                             f"{', '.join([*LEVELS, 'native'])}")
        need, above = LEVELS[override]
        lacking = [f for f in need if f not in flags]
        if lacking:
            raise ValueError(f"{ISA_OVERRIDE}={override}: this CPU ({name}) has no {', '.join(lacking)}, so it "
                             "cannot execute that level's code; choose a lower level or unset it")
        flags = {f for f in flags if not f.startswith(above)}
    x86 = arch in X86_ARCHES
    llvm_cpu = cpu_override or system_cpu or ("generic" if not x86 else _level_cpu("avx2", vendor))
    if x86:
        promised = features(llvm_cpu) if features is not None else None
        if promised is not None:
            beyond = sorted(LLVM_FEATURES[f] for f, on in promised.items() if on and LLVM_FEATURES[f] not in flags)
            if beyond and cpu_override:
                raise ValueError(f"{CPU_OVERRIDE}={cpu_override} needs {', '.join(beyond)}, which this CPU "
                                 f"({name}{', as ' + override if override else ''}) does not have")
            if beyond:
                level = next((lv for lv in ("avx512vnni", "avx512", "avx2") if all(
                    f in flags for f in LEVELS[lv][0])), None)
                if level is None:
                    raise RuntimeError(f"this CPU ({name}) has no AVX2+FMA: effopt's CPU kernels need at least AVX2")
                fallback = _level_cpu(level, vendor)
                notes.append(f"LLVM names this CPU {llvm_cpu}, which has {', '.join(beyond)}, but the CPU "
                             f"{'(as ' + override + ') ' if override else ''}does not: kernels are built "
                             f"for {fallback}")
                llvm_cpu = fallback
            # the flags a choice reads are what both the CPU and the LLVM CPU have (EFFOPT_HOST_CPU=znver3 on
            # an AVX-512 machine: AVX2 kernels, and the tests expect AVX2's forms)
            promised = features(llvm_cpu) or {}
            flags = {f for f in flags if f not in LLVM_FEATURES.values() or
                     any(on and LLVM_FEATURES[k] == f for k, on in promised.items())}
            if promised and not promised.get("avx512f"):
                flags = {f for f in flags if not f.startswith(("avx512", "avx10"))}
    return Host(name, arch, vendor, frozenset(flags), llvm_cpu, override or None, tuple(notes))


@functools.lru_cache(maxsize=None)
def host() -> Host:
    """This machine, under EFFOPT_HOST_ISA / EFFOPT_HOST_CPU; cached for the process (reset() after changing
    them)."""
    name, vendor, flags = read_cpuinfo()
    cpu = os.environ.get(CPU_OVERRIDE, "").strip() or None
    return make_host(name, vendor, flags, platform.machine(), _system_cpu(), isa_override(), cpu)


def isa_override() -> str | None:
    """EFFOPT_HOST_ISA's level, or None ("native" or unset)."""
    level = os.environ.get(ISA_OVERRIDE, "").strip().lower()
    return None if level in ("", "native") else level


def torch_environment(level: str | None = None) -> dict[str, str]:
    """The variables that limit torch's own kernels to `level` (default: the override's; {} for none)."""
    return dict(TORCH_ENV.get(level or isa_override() or "", {}))


def apply_torch_environment() -> None:
    """At `import effopt`: limit torch to the override's level where the caller did not set the variables."""
    for k, v in torch_environment().items():
        os.environ.setdefault(k, v)


_INT8_GEMM: list = []  # [why torch._int_mm is unusable, or None], found once per process


def torch_int8_gemm() -> str | None:
    """Why torch._int_mm must not run int8 GEMMs on this host, or None: it must be exact (oneDNN limited
    below the CPU's ISA returns saturated sums) and the CPU must have an int8 dot product (without one it is
    a reference loop, slower than the float32 GEMM)."""
    if not _INT8_GEMM:
        h = host()
        if not h.fast_int8:
            _INT8_GEMM.append(f"torch._int_mm is slower than the float32 GEMM on this CPU ({h.level}: no int8 "
                              "dot-product instruction such as VNNI)")
            return _INT8_GEMM[0]
        import torch

        g = torch.Generator().manual_seed(0)
        a = torch.randint(-128, 128, (128, 512), dtype=torch.int8, generator=g)
        b = torch.randint(-128, 128, (512, 256), dtype=torch.int8, generator=g)
        try:
            exact = torch.equal(torch._int_mm(a, b).to(torch.int64), a.to(torch.int64) @ b.to(torch.int64))
            _INT8_GEMM.append(None if exact else "torch._int_mm returns wrong (saturated) sums on this CPU")
        except RuntimeError as e:
            _INT8_GEMM.append(f"torch._int_mm fails here ({str(e).splitlines()[0][:120]})")
    return _INT8_GEMM[0]


def reset() -> None:
    """Forget the cached description (after changing EFFOPT_HOST_ISA / EFFOPT_HOST_CPU in this process)."""
    host.cache_clear()
    _INT8_GEMM.clear()

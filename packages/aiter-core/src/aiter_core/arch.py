"""What GPU we run on: vendor, arch name, SM/CU count, shared memory, warp size, fp8 type.

Detection order: the environment (``AITER_ARCH``, ``AITER_NUM_CU``) first, so GPU-less builds
and tests can pretend to be a given chip, then the torch device. An arch we do not know never
raises: it is reported (``known=False``) and the families treat it as "Triton only".

The result is cached per device index. ``get_arch_info`` is marked as a constant for
torch.compile, so a compiled graph does not trace into device queries.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

import torch

log = logging.getLogger("aiter_core")

# Facts for GPU-less use (AITER_ARCH set, no device) and for fields torch does not report.
# smem: the opt-in per-block maximum in bytes.
_KNOWN_ARCHS: dict[str, dict] = {
    "sm_80": dict(vendor="cuda", capability=(8, 0), num_cu=108, smem=166912, warp=32),
    "sm_86": dict(vendor="cuda", capability=(8, 6), num_cu=84, smem=101376, warp=32),
    "sm_89": dict(vendor="cuda", capability=(8, 9), num_cu=128, smem=101376, warp=32),
    "sm_90": dict(vendor="cuda", capability=(9, 0), num_cu=132, smem=232448, warp=32),
    "sm_100": dict(vendor="cuda", capability=(10, 0), num_cu=148, smem=232448, warp=32),
    "gfx90a": dict(vendor="rocm", capability=None, num_cu=104, smem=65536, warp=64),
    "gfx942": dict(vendor="rocm", capability=None, num_cu=304, smem=65536, warp=64),
    "gfx950": dict(vendor="rocm", capability=None, num_cu=256, smem=163840, warp=64),
    "gfx1100": dict(vendor="rocm", capability=None, num_cu=48, smem=65536, warp=32),
    "gfx1201": dict(vendor="rocm", capability=None, num_cu=32, smem=65536, warp=32),
    "gfx1250": dict(vendor="rocm", capability=None, num_cu=256, smem=327680, warp=32),
}


@dataclass(frozen=True)
class ArchInfo:
    vendor: str  # "cuda" | "rocm" | "cpu"
    name: str  # "sm_90", "gfx942", "cpu"
    capability: tuple[int, int] | None
    num_cu: int  # SMs on NVIDIA, CUs on AMD, CPU cores on the CPU
    smem_per_block: int  # bytes a block may opt in to
    warp_size: int
    device_name: str
    known: bool  # False: an arch we have no facts for; families use Triton only
    source: str  # "device" | "env" | "cpu"

    @property
    def fp8_dtype(self) -> torch.dtype | None:
        """The arch's native e4m3 flavour: fnuz on gfx942/gfx90a, OCP e4m3fn elsewhere."""
        if self.vendor == "cpu":
            return torch.float8_e4m3fn
        if self.name in ("gfx942", "gfx90a", "gfx940", "gfx941"):
            return torch.float8_e4m3fnuz
        if self.vendor == "cuda" and self.capability is not None and self.capability < (8, 9):
            return None  # no fp8 tensor cores before Ada
        return torch.float8_e4m3fn

    @property
    def arch_specific_target(self) -> str | None:
        """The arch-specific compile target (wgmma/TMA need sm_90a), if the chip has one."""
        if self.vendor == "cuda" and self.capability in ((9, 0), (10, 0)):
            return self.name + "a"
        return None

    @property
    def triton_only(self) -> bool:
        return not self.known

    def describe(self) -> str:
        fp8 = str(self.fp8_dtype).replace("torch.", "") if self.fp8_dtype else "none"
        extra = "" if self.known else " (unknown arch: Triton backends only)"
        return (
            f"{self.device_name}: {self.vendor} {self.name}{extra}, {self.num_cu} SMs/CUs, "
            f"{self.smem_per_block // 1024} KiB shared memory per block, warp {self.warp_size}, "
            f"fp8 {fp8} [from {self.source}]"
        )


def normalize_arch_name(name: str) -> str:
    """'sm90', 'SM_90a', '9.0' -> 'sm_90'; 'gfx942:sramecc+:xnack-' -> 'gfx942'."""
    raw = name.strip().lower()
    raw = raw.split(":")[0]
    m = re.fullmatch(r"(?:sm_?|compute_?)?(\d{1,2})\.?(\d)a?", raw)
    if m:
        return f"sm_{m.group(1)}{m.group(2)}"
    return raw


def _from_env(device_index: int) -> ArchInfo | None:
    env_arch = os.environ.get("AITER_ARCH")
    if not env_arch:
        return None
    name = normalize_arch_name(env_arch)
    facts = _KNOWN_ARCHS.get(name)
    if name == "cpu":
        facts = dict(vendor="cpu", capability=None, num_cu=os.cpu_count() or 1, smem=0, warp=1)
    vendor = facts["vendor"] if facts else ("rocm" if name.startswith("gfx") else "cuda")
    if facts is None:
        log.warning("AITER_ARCH=%s is not an arch aiter knows; treating it as Triton only", env_arch)
    capability = facts["capability"] if facts else None
    m = re.fullmatch(r"sm_(\d+)(\d)", name)
    if capability is None and m:
        capability = (int(m.group(1)), int(m.group(2)))
    return ArchInfo(
        vendor=vendor,
        name=name,
        capability=capability,
        num_cu=_num_cu_override() or (facts["num_cu"] if facts else 1),
        smem_per_block=facts["smem"] if facts else 49152,
        warp_size=facts["warp"] if facts else (64 if name.startswith("gfx9") else 32),
        device_name=f"AITER_ARCH={env_arch}",
        known=facts is not None,
        source="env",
    )


def _num_cu_override() -> int | None:
    value = os.environ.get("AITER_NUM_CU") or os.environ.get("CU_NUM")
    if not value:
        return None
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"AITER_NUM_CU must be a positive integer, got {value!r}") from None
    if n <= 0:
        raise ValueError(f"AITER_NUM_CU must be a positive integer, got {value!r}")
    return n


def _from_device(device_index: int) -> ArchInfo:
    props = torch.cuda.get_device_properties(device_index)
    if torch.version.hip:
        name = normalize_arch_name(getattr(props, "gcnArchName", "") or "gfx_unknown")
        vendor, capability = "rocm", None
    else:
        capability = (props.major, props.minor)
        name = f"sm_{props.major}{props.minor}"
        vendor = "cuda"
    facts = _KNOWN_ARCHS.get(name)
    if facts is None:
        log.warning("GPU arch %s (%s) is not in aiter's table: Triton backends only", name, props.name)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or (facts["smem"] if facts else 49152)
    warp = getattr(props, "warp_size", 0) or (facts["warp"] if facts else 32)
    return ArchInfo(
        vendor=vendor,
        name=name,
        capability=capability,
        num_cu=_num_cu_override() or props.multi_processor_count,
        smem_per_block=int(smem),
        warp_size=int(warp),
        device_name=props.name,
        known=facts is not None,
        source="device",
    )


def _cpu_info() -> ArchInfo:
    return ArchInfo(
        vendor="cpu",
        name="cpu",
        capability=None,
        num_cu=_num_cu_override() or (os.cpu_count() or 1),
        smem_per_block=0,
        warp_size=1,
        device_name="CPU (no GPU visible to torch)",
        known=True,
        source="cpu",
    )


_CACHE: dict[int, ArchInfo] = {}


def _device_index(device) -> int:
    if device is None:
        return torch.cuda.current_device() if torch.cuda.is_available() else -1
    device = torch.device(device)
    if device.type == "cpu":
        return -1
    return device.index if device.index is not None else torch.cuda.current_device()


def _lookup(index: int) -> ArchInfo:
    info = _CACHE.get(index)
    if info is None:
        info = _from_env(index)
        if info is None:
            info = _cpu_info() if index < 0 else _from_device(index)
        _CACHE[index] = info
    return info


# What torch.compiler.assume_constant_result does, without its import of torch._dynamo (and
# with it Triton), which would cost every `import aiter_core` about a second.
# test_arch_dtypes.py::test_cached_and_compile_safe guards this against torch changes.
_lookup._dynamo_marked_constant = True


def get_arch_info(device=None) -> ArchInfo:
    """Arch facts of ``device`` (default: the current CUDA device, else the CPU). Cached."""
    return _lookup(_device_index(device))


def clear_cache() -> None:
    """Forget cached detection (tests change AITER_ARCH / AITER_NUM_CU)."""
    _CACHE.clear()


# Upstream-compatible names (AITER's chip_info); on NVIDIA the "gfx" is the sm name.
def get_gfx(device=None) -> str:
    return get_arch_info(device).name


def get_cu_num(device=None) -> int:
    return get_arch_info(device).num_cu


def get_num_xcds(device=None) -> int:
    """Chiplets sharing one L2 (AMD MI300: 8). NVIDIA chips have one."""
    info = get_arch_info(device)
    return 8 if info.name in ("gfx942", "gfx950") else 1

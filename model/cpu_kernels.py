"""The CPU decode kernels of `cpu_kernels.cpp`, built on first use with torch's C++ extension loader.

Each wrapper takes the kernel when its inputs fit (fp32, CPU, the layouts below) and the plain torch
formula otherwise, so callers stay device- and dtype-agnostic. Without AVX2, without a compiler, or
with MAVERICK_CPU_KERNELS=0, `available()` is False and everything takes the torch path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
NAME = "maverick_cpu_kernels"
CFLAGS, LDFLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"], ["-fopenmp"]
MAX_ROWS = 64  # above this (prefill) the library GEMM is as fast; kMaxSkinnyRows in the .cpp

_tried = False
_ready = False


def available() -> bool:
    global _tried, _ready
    if not _tried:
        _tried = True
        _ready = _build()
    return _ready


def _build() -> bool:
    if os.environ.get("MAVERICK_CPU_KERNELS", "1") == "0":
        return False
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        log.info("CPU without AVX2: decode steps stay on the library kernels")
        return False
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        # torch rebuilds whenever its build file changes, and that file names the source's absolute
        # path: a second checkout, or a `ray up` host's copy, would rebuild (~30-50 s on 2 cores). The
        # library is kept under a key of what it is built from instead, and loaded from there.
        build_dir = Path(_get_build_directory(NAME, False))  # torch's (TORCH_EXTENSIONS_DIR respected)
        kept = build_dir.parent / f"{NAME}-{_build_key()}.so"
        if kept.is_file():
            torch.ops.load_library(str(kept))
            return True
        load(NAME, [str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, is_python_module=False, verbose=False)
        _keep(build_dir / f"{NAME}.so", kept)
        return True
    except Exception as exc:  # no compiler, no ninja, a read-only cache: the torch path still works
        log.warning("could not build the CPU decode kernels (%s): decode steps stay on the library kernels", exc)
        return False


def _build_key() -> str:
    """What the library depends on: the source, the flags, torch and Python."""
    what = [SOURCE.read_bytes(), repr((CFLAGS, LDFLAGS, torch.__version__, sys.version_info[:2])).encode()]
    return hashlib.sha256(b"\0".join(what)).hexdigest()[:16]


def _keep(built: Path, kept: Path) -> None:
    """A copy of the library torch built, under its key (written whole: other ranks may read it at once)."""
    if not built.is_file():  # torch's layout changed: the next start builds again, nothing breaks
        return
    partial = kept.with_name(f"{kept.name}.{os.getpid()}")
    try:
        shutil.copyfile(built, partial)
        os.replace(partial, kept)
    except OSError as exc:  # a full or read-only cache: the kernels are loaded all the same
        log.info("could not keep the CPU kernels' library at %s: %s", kept, exc)


def _fp32_cpu(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def linear(x: torch.Tensor, w_OI: torch.Tensor) -> torch.Tensor:
    """x @ w_OI.T for x [..., I]; the kernel for up to MAX_ROWS rows."""
    x2 = x.reshape(-1, x.shape[-1])
    if (x2.shape[0] <= MAX_ROWS and x2.shape[1] % 8 == 0 and x2.stride(1) == 1 and w_OI.is_contiguous()
            and _fp32_cpu(x2, w_OI) and available()):
        return torch.ops.maverick.skinny_linear(x2, w_OI).view(*x.shape[:-1], w_OI.shape[0])
    return F.linear(x, w_OI)


def matmul(x: torch.Tensor, w_IO: torch.Tensor) -> torch.Tensor:
    """x @ w_IO; the kernel applies when w_IO is the transposed view of an [O, I] matrix."""
    return linear(x, w_IO.T) if w_IO.T.is_contiguous() else x @ w_IO


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) over the last dim, in fp32, cast back, then times weight."""
    if (x.is_contiguous() and x.shape[-1] % 8 == 0 and _fp32_cpu(x, *(() if weight is None else (weight,)))
            and available()):
        return torch.ops.maverick.rms_norm(x, weight, eps)
    y = F.rms_norm(x.float(), (x.shape[-1],), eps=eps).type_as(x)
    return y if weight is None else y * weight


def silu_mul(gate_up_TF2: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for [..., 2F] = [gate | up]."""
    h = gate_up_TF2.reshape(-1, gate_up_TF2.shape[-1])
    if h.shape[-1] % 16 == 0 and h.stride(1) == 1 and _fp32_cpu(h) and available():
        return torch.ops.maverick.silu_mul(h).view(*gate_up_TF2.shape[:-1], h.shape[-1] // 2)
    gate, up = gate_up_TF2.chunk(2, dim=-1)
    return F.silu(gate) * up


def grouped_experts_fit(x_ND: torch.Tensor, gate_up_eOI: torch.Tensor, down_eOI: torch.Tensor) -> bool:
    return (x_ND.shape[-1] % 8 == 0 and down_eOI.shape[-1] % 8 == 0 and gate_up_eOI.is_contiguous()
            and down_eOI.is_contiguous() and _fp32_cpu(x_ND, gate_up_eOI, down_eOI) and available())


def grouped_experts(x_sorted_ND: torch.Tensor, counts_e: torch.Tensor, gate_up_eOI: torch.Tensor,
                    down_eOI: torch.Tensor) -> torch.Tensor:
    """Rows sorted by local expert, counts_e rows each, through their expert's SwiGLU; weights
    [e, out, in]. Needs `grouped_experts_fit`."""
    return torch.ops.maverick.grouped_experts(x_sorted_ND.contiguous(), counts_e, gate_up_eOI, down_eOI)


def decode_attention_fits(q_BHK: torch.Tensor, cache_GSK: torch.Tensor) -> bool:
    return (q_BHK.shape[-1] % 8 == 0 and q_BHK.stride(2) == 1 and q_BHK.stride(1) == q_BHK.shape[2]
            and cache_GSK.is_contiguous() and _fp32_cpu(q_BHK, cache_GSK) and available())


def decode_attention(q_BHK: torch.Tensor, k_GSK: torch.Tensor, v_GSK: torch.Tensor, slots_BL: torch.Tensor,
                     lengths_B: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v per sequence over its first lengths_B[b] slots; needs `decode_attention_fits`."""
    return torch.ops.maverick.decode_attention(q_BHK, k_GSK, v_GSK, slots_BL, lengths_B, scale)

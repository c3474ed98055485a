"""The sense loss as one compiled CPU kernel: forward and backward in a single pass.

At a demo-sized micro batch (~140 labelled positions, K = 20, d = 384) the batched torch
loss (losses._SenseLoss) costs more in its ~40 small tensor ops and in materialising the
[positions, K, d] gather than in arithmetic. `sense_loss.c` walks the labelled positions once:
each position's senses are read once (they stay in cache) for the logits, the softmax and the
state's gradient, and nothing of size positions x K x d is built. The gradient of the summed
loss is computed in forward; backward only scales it.

The kernel is plain C (no torch headers, so it builds in about a second), compiled on first
use with the system C compiler into TORCH_EXTENSIONS_DIR (else ~/.cache/dist_sense) under a
name keyed by the source, the flags and this CPU's features, and loaded with ctypes. Without
a compiler, or with DIST_SENSE_FUSED_LOSS=0, losses.py keeps the torch version (it is also the
version for CUDA tensors and mixed or half precision).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = ("sense_loss.c", "sense_loss_body.h")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c11", "-shared", "-fPIC")
SIMILARITY_CODES = {"dot": 0, "cos": 1, "l2": 2}
ERR_TARGET, ERR_SOFT_ID = -(1 << 40), -(2 << 40)
DTYPES = {torch.float32: "sense_loss_f32", torch.float64: "sense_loss_f64"}

_library: ctypes.CDLL | None = None
_unavailable: str | None = None  # why the kernel could not be built, once known


def cache_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache")
    return Path(root).expanduser() / "dist_sense_kernels"


def _cpu_features() -> str:
    """The CPU flags line (-march=native builds for them), so a shared cache never serves another CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build(compiler: str | None = None) -> Path:
    """Compile the kernel into the cache (atomically: a crash never leaves a half-written library)."""
    compiler = compiler or os.environ.get("CC", "gcc")
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((here / name).read_bytes())
    digest.update(" ".join((compiler, *FLAGS, _cpu_features())).encode())
    target = cache_dir() / f"sense_loss_{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        cmd = [compiler, *FLAGS, "-o", str(partial), str(here / "sense_loss.c"), "-lm"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as err:
            raise RuntimeError(f"{' '.join(cmd)} could not start: {err}") from err
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr.strip()}")
        os.replace(partial, target)
    return target


def library() -> ctypes.CDLL | None:
    """The loaded kernel, building it on first use; None (with one warning) where it cannot be built."""
    global _library, _unavailable
    if _library is not None or _unavailable is not None:
        return _library
    if os.environ.get("DIST_SENSE_FUSED_LOSS", "1") == "0":
        _unavailable = "DIST_SENSE_FUSED_LOSS=0"
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (OSError, RuntimeError) as err:
        _unavailable = str(err)
        log.warning("fused sense loss unavailable, using the torch version: %s", err)
        return None
    pointer, i64, f64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    for name in DTYPES.values():
        fn = getattr(lib, name)
        fn.restype = i64
        fn.argtypes = [pointer, i64, i64, pointer, pointer, pointer, i64, i64, pointer, pointer, i64,
                       pointer, pointer, i64, f64, i32, f64, pointer, pointer, pointer]
    _library = lib
    return lib


def unavailable_reason() -> str | None:
    """Why the kernel could not be loaded (None if it loaded or was not tried)."""
    return _unavailable


def usable(states: torch.Tensor, centres: torch.Tensor, soft_probs: torch.Tensor | None) -> bool:
    """Whether these inputs can take the kernel: CPU, one precision (fp32 or fp64) throughout."""
    if states.device.type != "cpu" or centres.device.type != "cpu":
        return False
    if states.dtype not in DTYPES or centres.dtype != states.dtype:
        return False
    if soft_probs is not None and soft_probs.device.type != "cpu":
        return False
    return library() is not None


def _ptr(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


class _FusedSenseLoss(torch.autograd.Function):
    """(mean loss over labelled positions, counts [n, top1, top5]); the gradient is computed in forward."""

    @staticmethod
    def forward(ctx, flat_states, ids, targets, centres, mask, token_to_row, soft_ids, soft_probs,
                temperature: float, similarity: str, loss_scale: float, want_grad: bool):
        positions, width = flat_states.shape
        grad = torch.empty_like(flat_states) if want_grad else None
        loss = flat_states.new_empty(())
        counts = torch.empty(3, dtype=torch.long)
        soft_k = 0 if soft_ids is None else soft_ids.shape[1]
        status = getattr(library(), DTYPES[flat_states.dtype])(
            flat_states.data_ptr(), positions, width, ids.data_ptr(), targets.data_ptr(),
            centres.data_ptr(), centres.shape[1], centres.shape[2], mask.data_ptr(), token_to_row.data_ptr(),
            token_to_row.shape[0], _ptr(soft_ids), _ptr(soft_probs), soft_k, temperature,
            SIMILARITY_CODES[similarity], loss_scale, _ptr(grad), loss.data_ptr(), counts.data_ptr())
        if status <= ERR_SOFT_ID:
            pos = ERR_SOFT_ID - status
            raise ValueError(f"soft target ids {soft_ids[pos].tolist()} at flat position {pos}: "
                             f"sense ids must be < K_max={centres.shape[1]}")
        if status <= ERR_TARGET:
            pos = ERR_TARGET - status
            raise ValueError(f"target {int(targets[pos])} at flat position {pos}: sense ids must be < "
                             f"K_max={centres.shape[1]} (labels from another dictionary?)")
        if status != 0:
            raise MemoryError("fused sense loss: no memory for its scratch buffer")
        ctx.grad = grad
        ctx.mark_non_differentiable(counts)
        return loss, counts

    @staticmethod
    def backward(ctx, grad_loss, _grad_counts):
        grad = ctx.grad if grad_loss.item() == 1.0 else ctx.grad * grad_loss  # 1.0: a plain loss.backward()
        return grad, None, None, None, None, None, None, None, None, None, None, None


def _contiguous(tensor, dtype=None):
    if tensor is None:
        return None
    if dtype is not None and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    return tensor if tensor.is_contiguous() else tensor.contiguous()


def sense_kd_loss(student_states, input_ids, targets, centres, sense_mask, token_to_row, soft_ids=None,
                  soft_probs=None, temperature: float = 1.0, similarity: str = "dot"):
    """losses.sense_kd_loss on the kernel (see there); callers check `usable` first."""
    d = student_states.shape[-1]
    dtype = student_states.dtype
    flat = _contiguous(student_states.reshape(-1, d))
    if centres.shape[-1] != d + (similarity == "l2"):
        raise ValueError(f"senses of width {centres.shape[-1]} for states of width {d} and similarity "
                         f"{similarity!r} (l2 and cos need losses.sense_table)")
    soft_i = soft_p = None
    if soft_ids is not None:
        soft_i = _contiguous(soft_ids.reshape(-1, soft_ids.shape[-1]), torch.long)
        soft_p = _contiguous(soft_probs.reshape(-1, soft_probs.shape[-1]), dtype)
    loss_scale = temperature**2 if soft_ids is not None else 1.0
    loss, counts = _FusedSenseLoss.apply(
        flat, _contiguous(input_ids.reshape(-1), torch.long), _contiguous(targets.reshape(-1), torch.long),
        _contiguous(centres), _contiguous(sense_mask, torch.bool), _contiguous(token_to_row, torch.long),
        soft_i, soft_p, float(temperature), similarity, float(loss_scale), torch.is_grad_enabled() and flat.requires_grad)
    return loss, {"correct_top1": counts[1], "correct_top5": counts[2], "n": counts[0]}

"""
(a) The device, the versions, and the two ceilings the other sections compare with: the bf16
matrix-product rate on random data (8192^3, and the sampler's MLP product (16384 x 4096) @
(4096 x 14336)) and device-to-device copy bandwidth (bytes read + bytes written). Medians of 20
runs between CUDA events. Writes a-device.md and a-device.json (matmul_tflops, copy_gbs, device).
"""
import importlib.metadata
import os
import platform
import shutil
import subprocess

import torch

import gpu_common


def version(package):
    """The installed distribution's version, read from its metadata (importing lm_eval takes seconds)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def facts(s):
    s.table("item", "value")
    if s.cuda:
        p = torch.cuda.get_device_properties(0)
        s.row("device", f"{p.name}, compute capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
              f"{p.total_memory / 2**30:.1f} GiB")
        s.record(device=p.name, memory_gib=round(p.total_memory / 2**30, 1))
        smi = shutil.which("nvidia-smi")
        if smi:
            q = subprocess.run([smi, "--query-gpu=driver_version,clocks.sm,clocks.max.sm,power.limit",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            s.row("driver, SM clock now / max, power limit (nvidia-smi)", q.stdout.strip() or q.stderr.strip())
        s.row("CUDA (torch built with), cuDNN", f"{torch.version.cuda}, {torch.backends.cudnn.version()}")
    else:
        s.record(device="CPU (smoke run)")
    s.row("torch, Python", f"{torch.__version__}, {platform.python_version()}")
    s.row("triton, numpy, tokenizers, safetensors",
          ", ".join(version(m) for m in ("triton", "numpy", "tokenizers", "safetensors")))
    s.row("lm_eval (eval.harness), transformers", f"{version('lm_eval')}, {version('transformers')}")
    s.row("torchrun on PATH", shutil.which("torchrun") or "no (python3 -m torch.distributed.run instead)")
    s.row("CPU cores", os.cpu_count())


def matmul(s, m, k, n):
    """TFLOP/s of (m, k) @ (k, n) on random data, two input sets in turn (no cache reuse between runs)."""
    g = torch.Generator(device=s.dev).manual_seed(0)
    sets = [(torch.randn(m, k, generator=g, device=s.dev).to(s.dtype),
             torch.randn(k, n, generator=g, device=s.dev).to(s.dtype)) for _ in range(2)]
    out = torch.empty(m, n, device=s.dev, dtype=s.dtype)
    turn = iter(range(10**9))
    ms = s.median_ms(lambda: torch.mm(*sets[next(turn) % 2], out=out), reps=20, warmup=3)
    tflops = 2 * m * k * n / ms / 1e9
    s.row(f"{str(s.dtype)[6:]} matmul", f"({m} x {k}) @ ({k} x {n})", f"{ms:.3f}", f"{tflops:.3g} TFLOP/s")
    return tflops


def copy(s, nbytes):
    """GB/s of a device-to-device copy: bytes read plus bytes written."""
    x = torch.randn(nbytes // 4, device=s.dev)
    y = torch.empty_like(x)
    ms = s.median_ms(lambda: y.copy_(x), reps=20, warmup=3)
    gbs = 2 * nbytes / ms / 1e6
    s.row("copy (read + write)", f"{nbytes / 2**30:.2f} GiB fp32", f"{ms:.3f}", f"{gbs:.3g} GB/s")
    return gbs


def main():
    a = gpu_common.parser(__doc__).parse_args()
    s = gpu_common.Section(a, "a-device", "(a) Device, versions, ceilings")
    s.part("facts", lambda: facts(s))
    s.table("ceiling", "shape", "ms (median of 20)", "rate")
    big, mlp = (8192, (16384, 4096, 14336)) if s.cuda else (256, (256, 64, 160))
    tflops = s.part("matmul 8192^3", lambda: matmul(s, big, big, big))
    s.part("matmul MLP shape", lambda: matmul(s, *mlp))
    gbs = s.part("copy", lambda: copy(s, 2**31 if s.cuda else 2**24))
    s.record(matmul_tflops=tflops, copy_gbs=gbs)
    name = s.figures.get("device", "?")
    s.finish(f"{name}: {str(s.dtype)[6:]} matmul {tflops or float('nan'):.3g} TFLOP/s, "
             f"copy {gbs or float('nan'):.3g} GB/s")


if __name__ == "__main__":
    main()

"""What the CUDA attention kernels of this machine can do: native GQA, and their speed.

    python tools/gpu_probe.py

For each aten kernel (cuDNN, flash, memory-efficient): whether it accepts fewer KV heads than query
heads and gives the same result as with the KV heads repeated, and its forward rate in TFLOP/s for
a causal bf16 prefill (B=1, H=32, Hkv=8, S=16384, D=128), timed with CUDA events (median of 10
after 3 warm-ups). The rates decide the ``auto`` order in ``star_sp/ops/backends.py``.
"""

from __future__ import annotations

import statistics

import torch

from star_sp.ops.backends import KERNELS


def _time(fn, reps: int = 10) -> float:
    times = []
    for i in range(reps + 3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(a.elapsed_time(b))
    return statistics.median(times)


def decode() -> None:
    """One decode row against a long context: the phase-2 step of every layer."""
    for sk in (32768, 131072):
        q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 8, sk, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, 8, sk, 128, device="cuda", dtype=torch.bfloat16)
        floor_us = 2 * k.numel() * 2 / 4.3e12 * 1e6
        cells = []
        for name in ("cudnn", "flash", "efficient", "math"):
            try:
                ms = _time(lambda: KERNELS[name].forward(q, k, v, False, 128 ** -0.5))
                cells.append(f"{name} {ms * 1000:7.0f} us")
            except Exception as exc:  # noqa: BLE001
                cells.append(f"{name} failed ({type(exc).__name__})")
        print(f"decode Sq=1 Sk={sk} H=32/8 D=128 (KV read floor {floor_us:.0f} us): " + ", ".join(cells))


def main() -> None:
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    for name in ("cudnn", "flash", "efficient"):
        kernel = KERNELS[name]
        q = torch.randn(2, 8, 256, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(2, 2, 256, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(2, 2, 256, 128, device="cuda", dtype=torch.bfloat16)
        try:
            out, lse, _ = kernel._forward(q, k, v, True, 0.1)
            ref, ref_lse, _ = kernel._forward(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), True, 0.1)
            same = (out - ref).abs().max().item() < 1e-2 and (lse - ref_lse).abs().max().item() < 1e-3
            gqa = "yes" if same else "runs, WRONG result"
        except Exception as exc:  # noqa: BLE001 - a probe reports, it does not fail
            gqa = f"no ({type(exc).__name__}: {str(exc)[:80]})"
        s, h, hkv, d = 16384, 32, 8, 128
        q = torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, hkv, s, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, hkv, s, d, device="cuda", dtype=torch.bfloat16)
        times = []
        for i in range(13):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            kernel.forward(q, k, v, True, d ** -0.5)
            b.record()
            torch.cuda.synchronize()
            if i >= 3:
                times.append(a.elapsed_time(b))
        ms = statistics.median(times)
        flops = 4 * s * s * h * d / 2
        print(f"{name:10s} native GQA: {gqa:40s} causal fwd S={s}: {ms:7.2f} ms  {flops / ms / 1e9:6.0f} TFLOP/s")


if __name__ == "__main__":
    main()
    decode()

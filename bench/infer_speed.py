"""Student inference speed: OSNet x0.25 at 256x128 (random weights), images/s at batch 1 and 64.

    python bench/infer_speed.py                      # CPU, 2 threads: eager PyTorch vs ONNX Runtime settings
    python bench/infer_speed.py --threads 1 2 --seconds 5

Rows: eager PyTorch (fp32, no_grad), TorchScript (traced and frozen), and ONNX Runtime with the settings that
matter on a CPU: graph optimisation level (basic / all), intra-op threads, and whether idle threads spin. The
ratio column is against eager PyTorch at the same batch size and thread count. On CUDA (when there is one) the
model also runs eagerly in bf16 autocast and replayed as a CUDA graph. The machine's load (`uptime`) is printed
with the numbers: on a shared machine they move with it.
Target (DESIGN §7): >= 600 img/s at batch 1 on 2 CPU cores with ONNX Runtime.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdreid.models import build_model  # noqa: E402


def throughput(fn, batch: int, seconds: float) -> float:
    """Images per second of fn() (one batch per call): warm-up, then as many calls as fit in `seconds`
    (at least 3), best of three equal slices to damp a shared machine's noise."""
    for _ in range(3):
        fn()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < seconds / 4 or calls < 3:
        fn()
        calls += 1
    per_slice = max(1, calls)
    rates = []
    for _ in range(3):
        begin = time.perf_counter()
        for _ in range(per_slice):
            fn()
        rates.append(per_slice * batch / (time.perf_counter() - begin))
    return max(rates)


def onnx_session(path: str, threads: int, level: str, spinning: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="osnet_x0_25")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    args = parser.parse_args()

    from kdreid.export import export_model

    torch.manual_seed(0)
    model = build_model(args.arch, num_classes=0).eval()
    model.kdreid_meta = {"extra": {"input_size": [args.height, args.width]}}
    print(f"{args.arch} at {args.height}x{args.width}, random weights; torch {torch.__version__}", end="")
    try:
        import onnxruntime

        print(f", onnxruntime {onnxruntime.__version__}")
    except ImportError:
        onnxruntime = None
        print(" (onnxruntime not installed: ONNX rows skipped)")
    print(f"load before: {os.popen('uptime').read().strip()}")

    rows = []  # (backend, threads, batch, img/s)
    tmp = tempfile.mkdtemp()
    onnx_path = os.path.join(tmp, "student.onnx")
    if onnxruntime is not None:
        result = export_model(model, onnx_path, "onnx", dynamic_batch=True)
        print(f"exported {onnx_path}: max |diff| vs PyTorch {result.max_abs_diff:.2g}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.freeze(torch.jit.trace(model, torch.rand(1, 3, args.height, args.width)))

    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batches:
            x = torch.rand(batch, 3, args.height, args.width)
            with torch.inference_mode():
                rows.append(("pytorch eager fp32", threads, batch, throughput(lambda: model(x), batch, args.seconds)))
                rows.append(("torchscript frozen fp32", threads, batch,
                             throughput(lambda: traced(x), batch, args.seconds)))
            if onnxruntime is None:
                continue
            feed = {"images": x.numpy()}
            for level in ("basic", "all"):
                for spinning in (True, False):
                    session = onnx_session(onnx_path, threads, level, spinning)
                    name = f"onnxruntime opt={level} spin={'on' if spinning else 'off'}"
                    rows.append((name, threads, batch, throughput(lambda: session.run(None, feed), batch,
                                                                  args.seconds)))

    if torch.cuda.is_available():
        rows += cuda_rows(model, args)

    eager = {(t, b): rate for name, t, b, rate in rows if name.startswith("pytorch eager")}
    print(f"\n{'backend':<32} {'threads':>7} {'batch':>5} {'img/s':>9} {'vs eager':>9}")
    for name, threads, batch, rate in rows:
        base = eager.get((threads, batch))
        ratio = f"{rate / base:8.2f}x" if base else "        -"
        print(f"{name:<32} {threads!s:>7} {batch:>5} {rate:>9.1f} {ratio}")
    print(f"load after: {os.popen('uptime').read().strip()}")


def cuda_rows(model, args) -> list:
    """bf16 autocast eager and a replayed CUDA graph, on the GPU (threads column: 'cuda')."""
    rows = []
    model = model.cuda()
    for batch in args.batches:
        x = torch.rand(batch, 3, args.height, args.width, device="cuda")

        def eager():
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                return model(x)

        def synced(fn):
            def run():
                fn()
                torch.cuda.synchronize()
            return run

        rows.append(("cuda eager bf16", "cuda", batch, throughput(synced(eager), batch, args.seconds)))
        static_input = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            for _ in range(3):  # warm-up on a side stream, as CUDA graph capture requires
                model(static_input)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(static_input)
        rows.append(("cuda graph bf16", "cuda", batch, throughput(synced(graph.replay), batch, args.seconds)))
    return rows


if __name__ == "__main__":
    main()

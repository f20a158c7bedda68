"""Student inference speed: OSNet x0.25 at 256x128 (random weights), images/s at batch 1 and 64.

    python bench/infer_speed.py                      # CPU, 2 threads: eager PyTorch vs ONNX Runtime settings
    python bench/infer_speed.py --threads 1 2 --seconds 5
    taskset -c 0,1 python bench/infer_speed.py --threads 1 2     # "2 CPU cores" on a bigger machine

Rows: eager PyTorch (fp32, no_grad), TorchScript (traced and frozen), and ONNX Runtime with the session options
that matter on a CPU: graph optimisation level (basic / extended / all), execution mode (sequential / parallel),
intra-op threads, and whether idle threads spin. Each ONNX Runtime row is measured for kdreid's export
(`kdreid export --format onnx`) and, side by side, for a plain `torch.onnx.export` of torchreid's own
osnet_x0_25 (loaded from the torchreid 0.2.5 sdist by tests/reference.py; skipped when it is absent). The ratio
columns are against eager PyTorch at the same batch size and thread count, and ours against torchreid's. On CUDA
(when there is one) the model also runs eagerly in bf16 autocast and replayed as a CUDA graph. The machine's load
(`uptime`) is printed with the numbers: on a shared machine they move with it.
With more than one thread, a last pair of rows runs that many processes at once, each with a single-threaded
session (the "N procs x 1 thread" rows: total images/s), which is how a server keeps N cores busy with batch-1
requests.
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


# (graph optimisation level, execution mode, spinning) of the ONNX Runtime rows; the first is kdreid's default.
ORT_SETTINGS = [("all", "sequential", True), ("all", "sequential", False), ("extended", "sequential", True),
                ("basic", "sequential", True), ("all", "parallel", True)]


def onnx_session(path: str, threads: int, level: str, mode: str, spinning: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    options.intra_op_num_threads = threads
    # Parallel mode runs independent branches (OSNet's four streams) at once on inter-op threads.
    options.inter_op_num_threads = threads if mode == "parallel" else 1
    options.execution_mode = {"sequential": ort.ExecutionMode.ORT_SEQUENTIAL,
                              "parallel": ort.ExecutionMode.ORT_PARALLEL}[mode]
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3  # no warnings about unused initialisers
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def global_pool_variant(source: str, target: str) -> int:
    """Copy of an ONNX file with each ReduceMean over (H, W) (our channel gates' `x.mean((2, 3))`) replaced by
    GlobalAveragePool (what torchreid's AdaptiveAvgPool2d(1) exports): the same numbers, and the one op type in
    which the two OSNet graphs differ. -> the number of nodes replaced."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(source)
    constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in proto.graph.node
                 if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    constants.update({i.name: numpy_helper.to_array(i) for i in proto.graph.initializer})
    replaced = 0
    for index, node in enumerate(proto.graph.node):
        if node.op_type != "ReduceMean":
            continue
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        axes = attributes.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1] in constants:
            axes = constants[node.input[1]].tolist()
        if sorted(axes or []) == [2, 3] and attributes.get("keepdims", 1) == 1:
            proto.graph.node[index].CopyFrom(
                helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output), name=node.name))
            replaced += 1
    onnx.save(proto, target)
    return replaced


def _worker(path: str, batch: int, shape: tuple, seconds: float, level: str, barrier, results) -> None:
    """One process with its own single-threaded session: warm up, wait for the others, run for `seconds`."""
    import numpy as np

    session = onnx_session(path, 1, level, "sequential", True)
    feed = {"images": np.random.rand(batch, *shape).astype(np.float32)}
    for _ in range(5):
        session.run(None, feed)
    barrier.wait()
    start, done = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        session.run(None, feed)
        done += batch
    results.put(done / (time.perf_counter() - start))


def processes_throughput(path: str, processes: int, batch: int, shape: tuple, seconds: float,
                         level: str = "all") -> float:
    """Images/s of `processes` single-threaded ONNX Runtime sessions running at once, one per process (how a
    server fills its cores with batch-1 requests: one worker per core, no thread synchronisation per layer)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(processes), context.Queue()
    workers = [context.Process(target=_worker, args=(path, batch, shape, seconds, level, barrier, results))
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    total = sum(results.get(timeout=600) for _ in workers)
    for worker in workers:
        worker.join()
    return total


def torchreid_onnx(arch: str, height: int, width: int, path: str):
    """torchreid's own model (random weights) and a plain dynamic-batch export of it; None without the sdist."""
    try:
        from tests.reference import load_torchreid_module

        osnet = load_torchreid_module("torchreid/reid/models/osnet.py")
    except BaseException as error:  # pytest.skip raises a BaseException subclass when the sdist is absent
        print(f"torchreid reference unavailable ({type(error).__name__}: {error}); its rows are skipped")
        return None
    torch.manual_seed(0)
    model = getattr(osnet, arch)(num_classes=1, pretrained=False).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(1, 3, height, width),), path, dynamo=False, input_names=["images"],
                          output_names=["features"], opset_version=18,
                          dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}})
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="osnet_x0_25")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument("--global-pool-variant", action="store_true",
                        help="also time our export with ReduceMean(H, W) replaced by GlobalAveragePool")
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
    reference_path = os.path.join(tmp, "torchreid.onnx")
    variant_path = os.path.join(tmp, "student_global_pool.onnx")
    reference = None
    if onnxruntime is not None:
        result = export_model(model, onnx_path, "onnx", dynamic_batch=True)
        print(f"exported {onnx_path}: max |diff| vs PyTorch {result.max_abs_diff:.2g}")
        if args.arch.startswith("osnet"):
            reference = torchreid_onnx(args.arch, args.height, args.width, reference_path)
        if args.global_pool_variant:
            count = global_pool_variant(onnx_path, variant_path)
            print(f"global-pool variant: {count} ReduceMean nodes replaced by GlobalAveragePool")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.freeze(torch.jit.trace(model, torch.rand(1, 3, args.height, args.width)))

    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batches:
            x = torch.rand(batch, 3, args.height, args.width)
            with torch.inference_mode():
                rows.append(("pytorch eager fp32", threads, batch, throughput(lambda: model(x), batch, args.seconds)))
                if reference is not None:
                    # torchreid's model takes normalised images; the speed does not depend on the values.
                    rows.append(("torchreid: pytorch eager fp32", threads, batch,
                                 throughput(lambda: reference(x), batch, args.seconds)))
                rows.append(("torchscript frozen fp32", threads, batch,
                             throughput(lambda: traced(x), batch, args.seconds)))
            if onnxruntime is None:
                continue
            feed = {"images": x.numpy()}
            for level, mode, spinning in ORT_SETTINGS:
                name = f"ort {level} {mode[:3]} spin={'on' if spinning else 'off'}"
                for prefix, path in (("", onnx_path), ("torchreid: ", reference_path), ("gap: ", variant_path)):
                    if not os.path.exists(path):
                        continue
                    session = onnx_session(path, threads, level, mode, spinning)
                    rows.append((prefix + name, threads, batch,
                                 throughput(lambda: session.run(None, feed), batch, args.seconds)))
            if threads > 1:
                for prefix, path in (("", onnx_path), ("torchreid: ", reference_path)):
                    if os.path.exists(path):
                        rate = processes_throughput(path, threads, batch, (3, args.height, args.width),
                                                    args.seconds)
                        rows.append((f"{prefix}ort all, {threads} procs x 1 thread", threads, batch, rate))

    if torch.cuda.is_available():
        rows += cuda_rows(model, args)

    eager = {(t, b): rate for name, t, b, rate in rows if name.startswith("pytorch eager")}
    rates = {(name, t, b): rate for name, t, b, rate in rows}
    print(f"\n{'backend':<44} {'threads':>7} {'batch':>5} {'img/s':>9} {'vs eager':>9} {'vs torchreid':>12}")
    for name, threads, batch, rate in rows:
        base = eager.get((threads, batch))
        ratio = f"{rate / base:8.2f}x" if base else "        -"
        theirs = None if name.startswith("torchreid") else rates.get((f"torchreid: {name}", threads, batch))
        versus = f"{rate / theirs:11.2f}x" if theirs else "           -"
        print(f"{name:<44} {threads!s:>7} {batch:>5} {rate:>9.1f} {ratio} {versus}")
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

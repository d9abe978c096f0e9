"""Shared benchmark helpers: CUDA-graph timing, L2 rotation, byte floor, result rows.

API (nothing here touches CUDA at import):

- ``time_us(fns, calls_per_graph=None, replays=20) -> Timing``: median microseconds per call.
  ``fns`` is one zero-argument callable or a list of them (one per weight copy); the list is
  cycled so consecutive calls read different copies. After a warm-up, ``calls_per_graph`` calls
  are captured into ONE CUDA graph and the graph's replays are timed with ``torch.cuda.Event``.
  If the callable synchronises with the host (checked first with PyTorch's sync debug mode) or
  capture fails, it falls back to eager timing and says so in ``Timing.mode`` (``"graph"`` or
  ``"eager"``) and ``Timing.note``.
- ``l2_bytes()``: the card's L2 size. ``copies_needed(touched_bytes_per_call, bytes_per_copy)``:
  how many weight copies make the bytes a graph cycles through exceed ``L2_MULTIPLE`` x L2 (capped
  by ``max_bytes``). ``make_copies(tensors, n)``: the original plus ``n - 1`` clones of each.
- ``copy_bandwidth_gbs(nbytes=1 GiB)``: measured device-to-device copy, counting bytes read plus
  bytes written (the convention of SPEC.md §6: about 3.0 TB/s on H100, 4.2 on H200).
- ``byte_floor_us(nbytes, gbs)``: ``nbytes`` over that bandwidth, in microseconds.
- ``time_or_wall(fns, device, replays)``: ``time_us`` on CUDA; one wall-clock pass over ``fns`` on
  the CPU (``--dry-run``: exercises the code path, the figure means nothing).
  ``rel_err(out, ref)``: ``max |out - ref| / max |ref|`` in fp32, the benchmarks' correctness check.
- ``compile_in_processes(worker, todo, jobs)``: fill Triton's file cache in parallel before timing.
- ``env_info()``: card, torch / triton / transformers / CUDA versions, git commit, timestamp: the
  columns every results row starts with. ``write_results(rows, name, out_dir)``: writes
  ``<out_dir>/<name>.csv`` (appends, one header) and ``<name>.md``; ``markdown_table(rows, cols)``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import math
import multiprocessing
import os
import statistics
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

# Weights a graph cycles through must exceed L2 by this factor so replays read HBM, not L2.
L2_MULTIPLE = 4
# Aim each graph replay at about this long: long enough to amortise the graph launch (~5 us),
# short enough to keep a T=16384 benchmark fast.
TARGET_GRAPH_US = 5000.0
MAX_CALLS_PER_GRAPH = 200


@dataclass
class Timing:
    """Median microseconds per call and how it was measured."""

    us: float
    mode: str  # "graph" or "eager"
    calls_per_graph: int
    note: str = ""


def _as_list(fns: Callable[[], Any] | Sequence[Callable[[], Any]]) -> list[Callable[[], Any]]:
    if callable(fns):
        return [fns]
    fns = list(fns)
    if not fns or not all(callable(f) for f in fns):
        raise TypeError("fns must be a callable or a non-empty list of callables")
    return fns


def _eager_us(fns: list[Callable[[], Any]], calls: int, replays: int) -> list[float]:
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(calls):
            fns[i % len(fns)]()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return times


def time_us(
    fns: Callable[[], Any] | Sequence[Callable[[], Any]],
    calls_per_graph: int | None = None,
    replays: int = 20,
    warmup: int = 3,
    allow_eager: bool = True,
) -> Timing:
    """Median microseconds per call of ``fns`` (cycled), timed as CUDA-graph replays.

    Args:
        fns: a zero-argument callable, or a list of them (one per weight copy) that is cycled.
        calls_per_graph: calls captured into one graph (rounded up to a multiple of ``len(fns)``);
            ``None`` picks it from an eager estimate so one replay lasts about ``TARGET_GRAPH_US``.
        replays: timed graph replays; the median is reported.
        warmup: eager rounds over all of ``fns`` before capture (JIT compiles, autotuning, caches).
        allow_eager: fall back to eager timing when capture fails instead of raising.

    Returns:
        A :class:`Timing`.
    """
    fns = _as_list(fns)
    n = len(fns)
    # Warm up on a side stream, as torch.cuda.graphs recommends before capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            for f in fns:
                f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    if calls_per_graph is None:
        est = statistics.median(_eager_us(fns, n, 3))
        calls_per_graph = int(min(MAX_CALLS_PER_GRAPH, max(1, TARGET_GRAPH_US // max(est, 1.0))))
    calls_per_graph = max(n, math.ceil(calls_per_graph / n) * n)

    # A callable that synchronises with the host (``.item()``, ``nonzero``, ``unique``) cannot be
    # captured; find out with PyTorch's sync debug mode rather than by a failed capture, which can
    # leave the allocator's graph pool in a bad state.
    sync_note = ""
    previous = torch.cuda.get_sync_debug_mode()
    try:
        torch.cuda.set_sync_debug_mode("error")
        fns[0]()
    except RuntimeError as exc:
        sync_note = f"host sync in the callable: {str(exc).splitlines()[0][:120]}"
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    if sync_note:
        if not allow_eager:
            raise RuntimeError(sync_note)
        return Timing(statistics.median(_eager_us(fns, calls_per_graph, replays)), "eager", calls_per_graph,
                      sync_note)

    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(calls_per_graph):
                fns[i % n]()
        graph.replay()  # first replay uploads the graph; not timed
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager
        if not allow_eager:
            raise
        torch.cuda.synchronize()
        times = _eager_us(fns, calls_per_graph, replays)
        return Timing(statistics.median(times), "eager", calls_per_graph,
                      f"graph capture failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")

    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls_per_graph)
    del graph
    return Timing(statistics.median(times), "graph", calls_per_graph)


def l2_bytes(device: int | None = None) -> int:
    """L2 cache size of the current (or given) CUDA device in bytes."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device() if device is None else device)
    return int(getattr(props, "L2_cache_size", 50 * 2**20))


def copies_needed(
    touched_bytes_per_call: float,
    bytes_per_copy: float,
    l2: int | None = None,
    max_bytes: float = 8e9,
) -> int:
    """Weight copies to cycle through so the bytes read per cycle exceed ``L2_MULTIPLE`` x L2.

    Args:
        touched_bytes_per_call: bytes of weights one call actually reads.
        bytes_per_copy: bytes of one full copy of the weights (what a copy costs in memory).
        l2: L2 size in bytes (default: the current card's).
        max_bytes: memory budget for all copies together; caps the count (at least 1).
    """
    l2 = l2_bytes() if l2 is None else l2
    want = math.ceil(L2_MULTIPLE * l2 / max(touched_bytes_per_call, 1.0))
    cap = max(1, int(max_bytes // max(bytes_per_copy, 1.0)))
    return max(1, min(want, cap))


def make_copies(tensors: Sequence[torch.Tensor], n: int) -> list[tuple[torch.Tensor, ...]]:
    """``n`` sets of ``tensors``: the originals, then ``n - 1`` clones (separate memory)."""
    sets = [tuple(tensors)]
    for _ in range(n - 1):
        sets.append(tuple(t.clone() for t in tensors))
    return sets


def copy_bandwidth_gbs(nbytes: int = 2**30, replays: int = 10) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times) / 1e9


def byte_floor_us(nbytes: float, gbs: float) -> float:
    """Time in microseconds to move ``nbytes`` at ``gbs`` GB/s."""
    return nbytes / (gbs * 1e9) * 1e6


def time_or_wall(fns: list[Callable[[], Any]], device: torch.device, replays: int = 20) -> Timing:
    """:func:`time_us` on CUDA; on the CPU (dry runs) one wall-clock pass, just to exercise the path."""
    if device.type == "cuda":
        return time_us(fns, replays=replays)
    t0 = time.perf_counter()
    for f in fns:
        f()
    return Timing((time.perf_counter() - t0) * 1e6 / len(fns), "wall-cpu", len(fns))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |out - ref| / max |ref|`` in fp32."""
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


def compile_in_processes(worker: Callable[[list], list[str]], todo: list, jobs: int) -> None:
    """Run ``worker`` (which launches each task once so that Triton fills its file cache; returns
    notes on failures) over ``todo`` split across ``jobs`` spawned processes, and print the notes:
    Triton compiles are CPU-bound, the timing process then finds every binary cached."""
    jobs = max(1, min(jobs, len(todo)))
    t0 = time.perf_counter()
    if jobs == 1:
        notes = worker(todo)
    else:
        shards = [todo[i::jobs] for i in range(jobs)]
        try:
            with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                notes = [n for part in pool.map(worker, shards) for n in part]
        except Exception as exc:  # noqa: BLE001 - compiling in the timing process still works
            notes = [f"parallel compile failed ({type(exc).__name__}: {exc}); compiling on demand"]
    print(f"compiled {len(todo)} kernels in {jobs} processes: {time.perf_counter() - t0:.0f} s", flush=True)
    for n in notes:
        print(f"  compile: {n}")


def _git_commit() -> str:
    if os.environ.get("GSQ_COMMIT"):
        return os.environ["GSQ_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - a missing package is reported, not fatal
        return "absent"


def env_info() -> dict[str, str]:
    """The columns every results row starts with: card, versions, commit, UTC timestamp."""
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "card": card,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "cuda": str(torch.version.cuda),
        "commit": _git_commit(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "—"
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return "—" if v is None else str(v)


def markdown_table(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> str:
    """A markdown table of ``columns`` from ``rows`` (missing values and NaN print as ``—``)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def write_results(
    rows: list[dict[str, Any]],
    name: str,
    out_dir: str | os.PathLike | None = None,
    columns: Sequence[str] | None = None,
    preamble: str = "",
) -> tuple[Path, Path]:
    """Append ``rows`` to ``<out_dir>/<name>.csv`` and write ``<out_dir>/<name>.md``.

    The CSV keeps one header: rows with new columns rewrite it with the union of the columns
    (missing values empty).

    Args:
        rows: dicts, normally ``{**env_info(), ...measurements}``; all keys become CSV columns.
        name: file stem, e.g. ``"moe"``.
        out_dir: folder (created); default ``benchmarks/results``.
        columns: columns of the markdown table (default: every key of the first row).
        preamble: markdown text above the table (card, bandwidth, notes).

    Returns:
        The CSV and markdown paths.
    """
    out = Path(out_dir) if out_dir is not None else DEFAULT_RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    csv_path, md_path = out / f"{name}.csv", out / f"{name}.md"
    header, old_rows, rewrite = keys, [], True
    if csv_path.exists():
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rewrite = any(k not in header for k in keys)  # new columns: rewrite with the union
            if rewrite:
                old_rows = list(reader)
                header = header + [k for k in keys if k not in header]
    with open(csv_path, "w" if rewrite else "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        if rewrite:
            w.writeheader()
        w.writerows(old_rows + rows)
    table = markdown_table(rows, list(columns) if columns else keys)
    md_path.write_text((preamble.rstrip() + "\n\n" if preamble else "") + table + "\n")
    return csv_path, md_path

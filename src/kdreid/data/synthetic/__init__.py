"""The embedded synthetic benchmark: procedurally drawn people seen by cameras whose style belongs to a domain.

    kdreid data synth --out DATA [--domains synth_market ...] [--scale S] [--seed N] [--size HxW] [--gap G]

writes DATA/synth_market, synth_duke, synth_cuhk, synth_msmt in the Market-1501 layout (see writer.py), readable
with `--root DATA -d synth_market`. Flow per domain (design study §2.1): domains.py preset -> people.py identity
table -> camera.py camera styles -> plan.py who is seen where -> generate.py render chunks (render.py people,
scene.py backgrounds and occluders, camera.py sensor) -> writer.py files, manifest, truth, contact sheet.

Deterministic for a seed: every random stream is `np.random.default_rng([seed, crc32(domain), stream_id])`, and
chunks have their own streams, so --workers does not change a single pixel.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdreid.data.synthetic.domains import DOMAIN_NAMES, PRESETS, DomainPreset, with_gap
from kdreid.data.synthetic.generate import Domain, build_domain, render_chunk
from kdreid.data.synthetic.plan import check_pid_capacity
from kdreid.errors import KdreidError, sigterm_interrupts

__all__ = ["DOMAIN_NAMES", "PRESETS", "DomainPreset", "Domain", "build_domain", "render_chunk", "render_domain",
           "generate", "synth_command", "with_gap", "parse_size"]


@dataclass
class DomainSummary:
    name: str
    folder: Path
    truth: dict
    images: int  # files written, junk included
    seconds: float


def render_domain(name: str, *, scale: float, seed: int, gap: float = 1.0,
                  size: tuple[int, int] | None = None) -> np.ndarray:
    """Every image of a domain as uint8 (N, h, w, 3) at render size, before JPEG (for determinism checks)."""
    domain = build_domain(name, scale=scale, seed=seed, gap=gap, size=size)
    return np.concatenate([render_chunk(domain, c)[0] for c in range(domain.num_chunks)])


_WORKER_DOMAIN: tuple[Domain, Path] | None = None


def _init_worker(domain: Domain, folder: Path) -> None:
    global _WORKER_DOMAIN
    _WORKER_DOMAIN = (domain, folder)
    # Ctrl-C reaches the whole process group: the parent stops the pool, which ends its workers with SIGTERM (a
    # worker that raised KeyboardInterrupt itself would print its traceback); a forked worker also inherits the
    # command's SIGTERM handler (sigterm_interrupts), which would raise in the middle of a chunk
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _write_chunk_in_worker(chunk: int) -> list[list]:
    from kdreid.data.synthetic.writer import write_chunk

    domain, folder = _WORKER_DOMAIN
    return write_chunk(domain, chunk, folder)


def generate(
    out: str | Path,
    domains: list[str] | tuple[str, ...] = DOMAIN_NAMES,
    *,
    scale: float = 1.0,
    seed: int = 0,
    size: tuple[int, int] | None = None,
    gap: float = 1.0,
    workers: int = 1,
    progress: bool = False,
) -> list[DomainSummary]:
    """Write each domain under out/<name>/; returns what was written. `size` (H, W) overrides every camera's
    written size; `workers` processes render chunks in parallel without changing the output."""
    from kdreid.data.synthetic.writer import move_into_place, remove_stale_staging, staging_folder
    from kdreid.rundir import as_write_error, exclusive, first_missing

    domains = list(dict.fromkeys(domains))  # a name given twice is written once, not twice over
    _validate(domains, scale, gap, size, workers, seed)
    made = first_missing(out)  # the folder (or its topmost parent) this call makes, if any
    out = _output_folder(out)
    # Held for the whole run: two runs into one --out would share (and remove) each other's staging folders.
    with exclusive(out), _removed_if_left_empty(out, made):
        for name in domains:
            _refuse_non_folder(out / name)
        remove_stale_staging(out)
        summaries = []
        for name in domains:
            started = time.perf_counter()
            domain = build_domain(name, scale=scale, seed=seed, gap=gap, size=size)
            staging = staging_folder(out / name)  # out/<name> only appears once complete
            try:
                images, stats = _write_domain(domain, staging, workers, progress)
            except BaseException as error:  # interrupted or failed (a full disk): nothing half-written stays
                shutil.rmtree(staging, ignore_errors=True)
                if isinstance(error, OSError):  # also from a worker process, re-raised here by the pool
                    raise as_write_error(out / name, error) from None
                raise
            move_into_place(staging, out / name)
            summaries.append(DomainSummary(name, out / name, stats, images, time.perf_counter() - started))
    return summaries


@contextlib.contextmanager
def _removed_if_left_empty(out: Path, made: Path | None):
    """A run stopped (Ctrl-C, SIGTERM) or failed before its first domain was in place leaves no --out folder behind
    that it made itself, holding nothing but its lock file (and the parents it made with it)."""
    from kdreid.rundir import remove_made_folder_if_unused

    try:
        yield
    except BaseException:
        remove_made_folder_if_unused(out, made)
        raise


def _refuse_non_folder(folder: Path) -> None:
    """One line, before any rendering, when something not made by `data synth` stands where a domain goes: it would
    be replaced. A link to a folder too: regenerating would replace the user's link (or write through it)."""
    if folder.is_symlink():
        raise KdreidError(f"cannot write {folder}: it is a link (to {os.readlink(folder)}), not a domain folder; "
                          "remove the link or choose another --out")
    if folder.exists() and not folder.is_dir():
        raise KdreidError(f"cannot write {folder}: it is a file, not a domain folder; move it away or choose "
                          "another --out")


def _write_domain(domain: Domain, folder: Path, workers: int, progress: bool) -> tuple[int, dict]:
    """Every image, the manifest, the contact sheet and truth.json of `domain` into `folder`; (images, truth)."""
    from kdreid.data.synthetic.writer import SPLIT_FOLDERS, contact_sheet, write_chunk, write_manifest, write_truth

    for sub in SPLIT_FOLDERS.values():
        (folder / sub).mkdir(parents=True)
    chunks = range(domain.num_chunks)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(domain.plan), desc=domain.preset.name, unit="img", leave=False, disable=None)
    rows: list[list] = []
    if workers > 1 and domain.num_chunks > 1:
        # fork shares the plan without pickling; workers only use numpy and PIL (no torch threads to inherit)
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        with context.Pool(workers, initializer=_init_worker, initargs=(domain, folder)) as pool:
            for chunk_rows in pool.imap(_write_chunk_in_worker, chunks):  # imap keeps chunk order
                rows.extend(chunk_rows)
                if bar:
                    bar.update(len(chunk_rows))
    else:
        for chunk in chunks:
            chunk_rows = write_chunk(domain, chunk, folder)
            rows.extend(chunk_rows)
            if bar:
                bar.update(len(chunk_rows))
    if bar:
        bar.close()
    write_manifest(folder, rows)
    contact_sheet(domain, folder)
    return len(rows), write_truth(folder, domain)


def _output_folder(out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise KdreidError(f"--out {out} is a file; give a folder for the domains")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".kdreid-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise KdreidError(f"--out {out}: cannot write there ({error.strerror or error}); give a writable folder")
    return out


def parse_size(text: str | None) -> tuple[int, int] | None:
    """'128x64' -> (128, 64)."""
    if text is None:
        return None
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise KdreidError(f"--size {text!r} is not HxW; write it as e.g. 128x64")
    height, width = (int(p) for p in parts)
    return height, width


def _validate(domains, scale, gap, size, workers, seed) -> None:
    unknown = [d for d in domains if d not in PRESETS]
    if unknown:
        raise KdreidError(f"unknown synthetic domain(s) {', '.join(unknown)}; known: {', '.join(DOMAIN_NAMES)}")
    if not (scale > 0 and math.isfinite(scale)):
        raise KdreidError(f"--scale {scale} must be a number > 0 (1.0 = the size of the dataset each domain mimics)")
    for name in domains:  # before any domain is rendered: not after hours of writing the ones that fit
        check_pid_capacity(PRESETS[name], scale)
    if not 0.0 <= gap <= 1.0:
        raise KdreidError(f"--gap {gap} must be between 0 (no domain style) and 1 (full preset)")
    if size is not None and (size[0] < 16 or size[1] < 8):  # checked here, not in parse_size: generate(size=)
        raise KdreidError(f"--size {size[0]}x{size[1]} is too small; use at least 16x8 (e.g. 128x64)")
    if workers < 1:
        raise KdreidError(f"--workers {workers} must be >= 1")
    if not 0 <= seed < 2**32:  # what numpy's generators take
        raise KdreidError(f"--seed {seed} must be between 0 and 2**32 - 1")


def synth_command(args) -> int:
    """`kdreid data synth`: write the domains and print one line per domain."""
    domains = args.domains or list(DOMAIN_NAMES)
    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)  # 0 is refused, not "all"
    with sigterm_interrupts():
        summaries = generate(args.out, domains, scale=args.scale, seed=args.seed, size=parse_size(args.size),
                             gap=args.gap, workers=workers, progress=True)
    for s in summaries:
        t = s.truth
        print(
            f"{s.name}: train {t['train']['ids']} ids / {t['train']['images']} images, "
            f"query {t['query']['ids']} / {t['query']['images']}, gallery {t['gallery']['ids']} / "
            f"{t['gallery']['images']}, {t['train']['cameras']} cameras -> {s.folder} "
            f"({s.images} files in {s.seconds:.1f} s, {s.images / max(s.seconds, 1e-9):.0f} images/s)"
        )
    return 0

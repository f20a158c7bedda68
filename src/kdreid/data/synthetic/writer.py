"""Writing a domain to disk in the Market-1501 layout, so that the real readers are exercised:

    OUT/<name>/bounding_box_train/  0002_c1s1_000451_01.jpg   train ids only
    OUT/<name>/query/               one image per (test id, camera)
    OUT/<name>/bounding_box_test/   the rest of the test ids, 0000_ distractors, -1_ junk
    OUT/<name>/manifest.csv         path,pid,camid,tracklet,split + every latent factor of every image
    OUT/<name>/truth.json           ids/images/cameras per split, counted as torchreid counts them
    OUT/<name>/contact_sheet.png    4 identities x 6 images, for a person to look at
"""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from kdreid.data.synthetic.camera import TIME_OF_DAY_NAMES
from kdreid.data.synthetic.generate import CHUNK_SIZE, Domain, render_chunk
from kdreid.data.synthetic.plan import KINDS, SPLITS
from kdreid.data.synthetic.scene import OCCLUDERS
from kdreid.rundir import as_write_error, atomic_write_bytes, atomic_write_text, write_json

SPLIT_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
MANIFEST_COLUMNS = (
    "path", "pid", "camid", "tracklet", "split", "kind", "identity", "twin_of", "camera", "seq", "frame", "box",
    "view", "phase", "scale", "dx", "dy", "occluder", "panorama", "pano_column", "time_of_day", "exposure",
    "jpeg_quality", "height", "width",
)


def relative_path(domain: Domain, i: int) -> str:
    return f"{SPLIT_FOLDERS[SPLITS[domain.plan.split[i]]]}/{domain.plan.file_name(i)}"


def staging_folder(folder: Path) -> Path:
    """Where a domain is written before it takes `folder`'s place: a hidden sibling."""
    return folder.with_name(f".{folder.name}.partial")


def remove_stale_staging(out: Path) -> None:
    """Remove the staging folders that killed runs (SIGKILL, a power loss) left in `out`, of every domain: they
    can be GBs. Only for a caller that holds `out` (rundir.exclusive), so that none is another run's. Only the
    synthetic domains' names: --out is often the root of real datasets, where other tools may stage too."""
    for staging in sorted(out.glob(".synth_*.partial")):
        try:
            if staging.is_dir() and not staging.is_symlink():
                shutil.rmtree(staging)
            else:
                staging.unlink()
        except OSError as error:
            raise as_write_error(staging, error) from None


def move_into_place(staging: Path, folder: Path) -> None:
    """Replace `folder` (a previous run's domain, if any) by the completely written `staging` folder, so that a
    domain folder is never half-written: an interrupted run leaves the previous domain, or none."""
    previous = folder.with_name(f".{folder.name}.previous")
    shutil.rmtree(previous, ignore_errors=True)
    if folder.exists():
        folder.rename(previous)
    staging.rename(folder)
    shutil.rmtree(previous, ignore_errors=True)


def write_chunk(domain: Domain, chunk: int, folder: Path) -> list[list]:
    """Render chunk `chunk`, write its JPEGs under `folder`, return its manifest rows."""
    images, factors = render_chunk(domain, chunk)
    plan, cameras = domain.plan, domain.cameras
    start = chunk * CHUNK_SIZE
    rows = []
    for k, pixels in enumerate(images):
        i = start + k
        camera = int(plan.camera[i])
        height, width = cameras.written_hw[camera]
        image = Image.fromarray(pixels)
        if image.size != (width, height):
            image = image.resize((width, height), Image.BILINEAR)
        quality = int(cameras.jpeg_quality[camera])
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        path = relative_path(domain, i)
        (folder / path).write_bytes(buffer.getvalue())
        tod = int(plan.time_of_day[i])
        rows.append([
            path, int(plan.pid[i]), int(plan.camid[i]), int(plan.tracklet[i]), SPLITS[plan.split[i]],
            KINDS[plan.kind[i]], int(plan.identity[i]), int(domain.people["twin_of"][plan.identity[i]]), camera + 1,
            int(plan.seq[i]), int(plan.frame[i]), int(plan.box[i]),
            f"{factors['view'][k]:.3f}", f"{factors['phase'][k]:.3f}", f"{factors['scale'][k]:.3f}",
            f"{factors['dx'][k]:.3f}", f"{factors['dy'][k]:.3f}", OCCLUDERS[factors["occluder"][k]],
            int(plan.panorama[i]), int(factors["pano_column"][k]), TIME_OF_DAY_NAMES[tod] if tod >= 0 else "",
            f"{plan.exposure[i]:.3f}", quality, height, width,
        ])
    return rows


def truth(domain: Domain) -> dict:
    """Statistics per split as torchreid counts them: junk (-1) dropped, the distractor label 0 counted as one id."""
    plan = domain.plan
    stats = {}
    for index, split in enumerate(SPLITS):
        keep = (plan.split == index) & (plan.pid >= 0)
        stats[split] = {
            "ids": int(len(np.unique(plan.pid[keep]))),
            "images": int(keep.sum()),
            "cameras": int(len(np.unique(plan.camid[keep]))),
        }
    return stats


def write_manifest(folder: Path, rows: list[list]) -> None:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    writer.writerows(rows)
    atomic_write_text(folder / "manifest.csv", text.getvalue())


def write_truth(folder: Path, domain: Domain) -> dict:
    stats = truth(domain)
    write_json(folder / "truth.json", stats)
    return stats


def contact_sheet(domain: Domain, folder: Path, ids: int = 4, per_id: int = 6, tile_width: int = 64) -> Path:
    """4 train identities x 6 images (spread over their cameras and tracklets), read back from the written files."""
    plan = domain.plan
    train = (plan.split == SPLITS.index("train")) & (plan.pid > 0)
    chosen = []
    for pid in dict.fromkeys(plan.pid[train].tolist()):  # plan order, which is random in pid
        members = np.flatnonzero(train & (plan.pid == pid))
        if len(members) >= per_id and len(np.unique(plan.camera[members])) >= 2:
            order = members[np.lexsort((plan.step[members], plan.tracklet[members], plan.camera[members]))]
            chosen.append(order[np.linspace(0, len(order) - 1, per_id).round().astype(int)])
        if len(chosen) == ids:
            break
    height, width = domain.render_hw
    tile_height = int(round(tile_width * height / width))
    gap = 2
    sheet = np.full(((tile_height + gap) * max(1, len(chosen)), (tile_width + gap) * per_id, 3), 255, np.uint8)
    for r, members in enumerate(chosen):
        for c, i in enumerate(members):
            with Image.open(folder / relative_path(domain, int(i))) as image:
                tile = np.asarray(image.convert("RGB").resize((tile_width, tile_height), Image.BILINEAR))
            y, x = r * (tile_height + gap), c * (tile_width + gap)
            sheet[y:y + tile_height, x:x + tile_width] = tile
    buffer = io.BytesIO()
    Image.fromarray(sheet).save(buffer, format="PNG")
    target = folder / "contact_sheet.png"
    atomic_write_bytes(target, buffer.getvalue())
    return target

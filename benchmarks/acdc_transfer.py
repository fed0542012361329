"""Carry the shared ACDC data to a lent GPU machine inside its transfer limit.

The device tool sends the checkout and at most 64 MiB with it; the shared
ACDC folder is 107 MB (gzip-compressed float32 HDF5). ``pack`` writes

* the 1,312 training slices as one xz-compressed blob of **8-bit** images
  (``round(255 * image)``; the originals hold 400-700 distinct grey levels
  per volume, so this rounds each pixel by at most 0.002 of the [0, 1] range)
  and their labels unchanged (uint8);
* the validation volumes and the list files as they are (bit-identical), so
  every number scored there is scored on the original validation data.

``unpack`` rebuilds the shared folder's layout (``slices/*.h5`` with
``image`` float32 = q / 255 and ``label``; ``volumes/*.h5``; the lists), which
the loaders read unchanged.

    python benchmarks/acdc_transfer.py pack ../shared/data/acdc .gpu_data
    python benchmarks/acdc_transfer.py unpack .gpu_data /tmp/acdc
"""
from __future__ import annotations

import argparse
import json
import lzma
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np

LISTS = ("train_slices.list", "train.list", "val.list")


def pack(src: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    names = [ln.strip() for ln in (src / "train_slices.list").read_text().splitlines() if ln.strip()]
    shapes, images, labels = [], [], []
    for name in names:
        with h5py.File(src / "slices" / f"{name}.h5", "r") as f:
            img, lab = f["image"][()], f["label"][()]
        shapes.append(list(img.shape))
        images.append(np.round(np.clip(img, 0.0, 1.0) * 255).astype(np.uint8).ravel())
        labels.append(lab.astype(np.uint8).ravel())
    blob = np.concatenate(images + labels).tobytes()
    (dest / "slices.xz").write_bytes(lzma.compress(blob, preset=9))
    (dest / "slices.json").write_text(json.dumps({"names": names, "shapes": shapes, "image": "uint8 = round(255 x)"}))
    (dest / "volumes").mkdir(exist_ok=True)
    for p in sorted((src / "volumes").glob("*.h5")):
        shutil.copy2(p, dest / "volumes" / p.name)
    for name in LISTS:
        shutil.copy2(src / name, dest / name)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(f"packed {len(names)} slices and {len(list((dest / 'volumes').glob('*.h5')))} volumes into {dest}: "
          f"{size / 2**20:.1f} MiB")


def unpack(src: Path, dest: Path) -> None:
    meta = json.loads((src / "slices.json").read_text())
    flat = np.frombuffer(lzma.decompress((src / "slices.xz").read_bytes()), dtype=np.uint8)
    sizes = [h * w for h, w in meta["shapes"]]
    n_img = sum(sizes)
    (dest / "slices").mkdir(parents=True, exist_ok=True)
    i = 0
    for name, (h, w), n in zip(meta["names"], meta["shapes"], sizes):
        img = flat[i:i + n].reshape(h, w).astype(np.float32) / 255.0
        lab = flat[n_img + i:n_img + i + n].reshape(h, w)
        i += n
        with h5py.File(dest / "slices" / f"{name}.h5", "w") as f:
            f["image"] = img
            f["label"] = lab
    shutil.copytree(src / "volumes", dest / "volumes", dirs_exist_ok=True)
    for name in LISTS:
        shutil.copy2(src / name, dest / name)
    print(f"unpacked {len(meta['names'])} slices into {dest}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=("pack", "unpack"))
    ap.add_argument("src", type=Path)
    ap.add_argument("dest", type=Path)
    a = ap.parse_args(argv)
    (pack if a.action == "pack" else unpack)(a.src, a.dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())

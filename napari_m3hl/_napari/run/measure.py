"""The Measurements group's worker jobs: plain data in and out, no Qt.

:func:`measure_job` measures a segmentation
(:func:`napari_m3hl.metrics.clinical.measure`); :func:`save_measurements_job`
writes measurements as CSV and JSON (atomic writes), re-measuring first what
Export wrote when it is given (the segmentation with the painted slices over it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

#: What the panel tells the user to do about a missing or implausible voxel size.
FIX_WIDGET = ("open the image from a NIfTI file that records its voxel size, or set the image layer's scale to it "
              "(mm, slice spacing first)")


def measure_job(labels: np.ndarray, spacing: Sequence[float] | None, source: str) -> Any:
    """:class:`napari_m3hl.metrics.clinical.Measurements` of ``labels`` ((D, H, W) or a
    (T, D, H, W) cine); raises ``M3HLInputError`` for a missing or implausible voxel size."""
    from napari_m3hl.metrics.clinical import measure

    return measure(labels, spacing, source=source, fix=FIX_WIDGET)


def save_measurements_job(csv_path: str | Path, result: Any, labels: np.ndarray | None = None,
                          painted: np.ndarray | None = None, spacing: Sequence[float] | None = None,
                          source: str = "the segmentation") -> list[str]:
    """Write ``result`` (or, with ``labels``, the measurements of ``labels``
    with the ``painted`` slices as painted: what Export wrote) to ``csv_path``
    and the ``.json`` beside it. Returns the two paths."""
    import json

    from napari_m3hl.fewslice.safeguard import merge_frames
    from napari_m3hl.io.files import atomic_write_text
    from napari_m3hl.metrics.clinical import measure

    if labels is not None:
        result = measure(merge_frames(labels, painted), spacing, source=source, fix=FIX_WIDGET)
    csv_path = Path(csv_path)
    if csv_path.suffix.lower() != ".csv":
        csv_path = csv_path.with_name(csv_path.name + ".csv")
    json_path = csv_path.with_suffix(".json")
    atomic_write_text(csv_path, result.to_csv())
    atomic_write_text(json_path, json.dumps(result.to_dict() | {"source": source}, indent=2))
    return [str(csv_path), str(json_path)]

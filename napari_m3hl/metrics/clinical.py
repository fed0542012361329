"""Clinical measures of a cardiac short-axis segmentation.

From ACDC-convention label maps (0 background, 1 RV, 2 Myo, 3 LV) and the
voxel size: the LV and RV blood-pool volumes (mL), the LV myocardial volume
(mL) and mass (g, at 1.05 g/mL), and with an end-diastolic (ED) and an
end-systolic (ES) frame the end-diastolic and end-systolic volumes (EDV,
ESV), stroke volume (SV = EDV − ESV) and ejection fraction
(EF = SV / EDV, %) of the LV and the RV.

A volume is the voxel count times the voxel volume: the through-plane size
is the header's slice spacing (centre to centre; Simpson's method of discs
sums slice areas times it), the in-plane size the pixel spacing. Voxel
sizes come from the file (or the user); a missing or implausible one is
refused (:func:`check_voxel_size`), never guessed.

Frames of a cine (``(T, D, H, W)``): every frame's volumes (the volume
curve); ED is the frame of the largest LV volume and ES that of the
smallest non-zero one, unless the caller names them.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from napari_m3hl.errors import M3HLInputError

#: Label values of the ACDC convention measured here.
RV, MYO, LV = 1, 2, 3
#: Myocardial tissue density, g/mL (the value used by cardiac MR guidelines).
MYOCARDIUM_DENSITY = 1.05
#: Plausible voxel sizes of a short-axis cine stack, mm: in-plane pixel and
#: through-plane slice spacing. Outside them the voxel size is refused.
IN_PLANE_MM = (0.1, 10.0)
THROUGH_PLANE_MM = (1.5, 30.0)
#: NIfTI spatial units -> millimetres (``unknown``: read as mm, the convention of
#: the tools that write NIfTI without setting the unit).
UNIT_TO_MM = {"mm": 1.0, "meter": 1000.0, "micron": 0.001, "unknown": 1.0}


#: What a refusal of the voxel size tells a command-line user to do.
FIX_CLI = "give the real voxel size with --spacing D H W (mm)"


def check_voxel_size(spacing: Sequence[float] | None, source: str = "the segmentation",
                     fix: str = FIX_CLI) -> tuple[float, float, float]:
    """The ``(D, H, W)`` voxel size in mm (through-plane first), checked.

    Raises :class:`M3HLInputError` naming ``source`` and ending with ``fix``
    (what to do) when it is missing, not three positive finite numbers, or
    outside the plausible range of a short-axis cine (:data:`IN_PLANE_MM`,
    :data:`THROUGH_PLANE_MM`).
    """
    if spacing is None:
        raise M3HLInputError(f"{source} has no voxel size, and volumes need one; {fix}")
    try:
        vals = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise M3HLInputError(f"{source}: voxel size {spacing!r} is not three numbers (mm)") from None
    if len(vals) != 3:
        raise M3HLInputError(f"{source}: voxel size {vals} must give 3 sizes (through-plane, then in-plane), mm")
    if not all(math.isfinite(v) and v > 0 for v in vals):
        raise M3HLInputError(f"{source} has no usable voxel size ({_fmt(vals)} mm): its header does not say how "
                             f"large a voxel is; {fix}")
    dz, dy, dx = vals
    lo, hi = THROUGH_PLANE_MM
    if not lo <= dz <= hi:
        hint = (" (1 × 1 × 1 mm is what a file saved without a voxel size reports, e.g. from an array or an .h5 "
                "volume)" if vals == (1.0, 1.0, 1.0) else "")
        raise M3HLInputError(f"{source}: slice spacing {dz:g} mm is implausible for a short-axis cine stack "
                             f"(expected {lo:g}-{hi:g} mm){hint}; {fix}")
    lo, hi = IN_PLANE_MM
    for v in (dy, dx):
        if not lo <= v <= hi:
            raise M3HLInputError(f"{source}: in-plane pixel size {v:g} mm is implausible (expected {lo:g}-{hi:g} "
                                 f"mm); {fix}")
    return vals


def spatial_unit_factor(header: Any) -> float:
    """Millimetres per unit of a NIfTI header's spatial unit (1 when ``header`` is None)."""
    if header is None or not hasattr(header, "get_xyzt_units"):
        return 1.0
    unit = header.get_xyzt_units()[0]
    return UNIT_TO_MM.get(str(unit), 1.0)


def voxel_size_from_geometry(header: Any = None, affine: Any = None) -> tuple[float, float, float] | None:
    """The ``(D, H, W)`` voxel size in mm (through-plane first) stated by a NIfTI
    ``header`` (its pixdim, in the header's spatial unit), else by a 4×4
    ``affine`` for the ``(X, Y, Z)`` index order (its column lengths); None
    when neither is given. Not checked: see :func:`check_voxel_size`."""
    if header is not None and hasattr(header, "get_zooms"):
        zooms = [float(z) for z in header.get_zooms()[:3]]
        if len(zooms) == 3:
            f = spatial_unit_factor(header)
            return (zooms[2] * f, zooms[1] * f, zooms[0] * f)
    if affine is not None:
        a = np.asarray(affine, dtype=np.float64)
        if a.shape[0] >= 3 and a.shape[1] >= 3:
            sx, sy, sz = (float(v) for v in np.linalg.norm(a[:3, :3], axis=0))
            return (sz, sy, sx)
    return None


@dataclass(frozen=True)
class FrameVolumes:
    """Volumes of one frame (one ``(D, H, W)`` segmentation).

    ``lv_ml`` / ``rv_ml``: blood-pool volumes (labels 3 / 1), mL;
    ``myo_ml``: LV myocardial volume (label 2), mL; ``myo_g``: its mass, g.
    """

    frame: int
    lv_ml: float
    rv_ml: float
    myo_ml: float
    myo_g: float


@dataclass(frozen=True)
class Function:
    """Systolic function of one ventricle: EDV, ESV, SV (mL) and EF (%).

    ``ef`` is NaN when the EDV is 0 (the ventricle is not segmented)."""

    edv_ml: float
    esv_ml: float
    sv_ml: float
    ef_pct: float


@dataclass
class Measurements:
    """What :func:`measure` gives: per-frame volumes and, with ED and ES, function.

    ``frames``: one :class:`FrameVolumes` per frame (one for a single volume);
    ``ed`` / ``es``: indices into ``frames`` (None for a single frame);
    ``lv`` / ``rv``: :class:`Function` (None for a single frame);
    ``spacing``: the ``(D, H, W)`` voxel size used, mm; ``notes``: warnings
    for the reader (e.g. an ED volume smaller than the ES one).
    """

    frames: list[FrameVolumes]
    spacing: tuple[float, float, float]
    ed: int | None = None
    es: int | None = None
    lv: Function | None = None
    rv: Function | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: units in the key names (``_ml``, ``_g``, ``_pct``, ``_mm``)."""
        out: dict[str, Any] = {"spacing_mm": list(self.spacing), "myocardium_density_g_per_ml": MYOCARDIUM_DENSITY,
                               "frames": [asdict(f) for f in self.frames]}
        if self.ed is not None:
            out.update(ed_frame=self.frames[self.ed].frame, es_frame=self.frames[self.es].frame,
                       lv=asdict(self.lv), rv=asdict(self.rv),
                       lv_myo_mass_ed_g=self.frames[self.ed].myo_g)
        out["notes"] = list(self.notes)
        return _finite_or_none(out)

    def to_csv(self) -> str:
        """Two sections as one CSV table: one row per frame (volumes), then one
        row per measure of function (``measure,value,unit``)."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["frame", "lv_ml", "rv_ml", "myo_ml", "myo_g", "phase"])
        for i, f in enumerate(self.frames):
            phase = "ED" if i == self.ed else "ES" if i == self.es else ""
            w.writerow([f.frame, _r(f.lv_ml), _r(f.rv_ml), _r(f.myo_ml), _r(f.myo_g), phase])
        if self.lv is not None:
            w.writerow([])
            w.writerow(["measure", "value", "unit"])
            for name, fn in (("LV", self.lv), ("RV", self.rv)):
                for key, unit in (("edv_ml", "mL"), ("esv_ml", "mL"), ("sv_ml", "mL"), ("ef_pct", "%")):
                    w.writerow([f"{name} {key.split('_')[0].upper()}", _r(getattr(fn, key)), unit])
            w.writerow(["LV myocardial mass (ED)", _r(self.frames[self.ed].myo_g), "g"])
        return buf.getvalue()

    def summary_lines(self) -> list[str]:
        """Human-readable lines with units (the CLI prints them, the widget shows them)."""
        lines = []
        if self.lv is None:
            f = self.frames[0]
            lines.append(f"LV blood pool {f.lv_ml:.1f} mL, RV blood pool {f.rv_ml:.1f} mL")
            lines.append(f"LV myocardium {f.myo_ml:.1f} mL, mass {f.myo_g:.1f} g")
        else:
            ed, es = self.frames[self.ed], self.frames[self.es]
            if len(self.frames) > 2:
                lines.append(f"ED = frame {ed.frame} (largest LV), ES = frame {es.frame} (smallest LV) "
                             f"of {len(self.frames)} frames")
            for name, fn in (("LV", self.lv), ("RV", self.rv)):
                lines.append(f"{name}: EDV {fn.edv_ml:.1f} mL, ESV {fn.esv_ml:.1f} mL, SV {fn.sv_ml:.1f} mL, "
                             f"EF {_pct(fn.ef_pct)}")
            lines.append(f"LV myocardial mass {ed.myo_g:.1f} g at ED ({ed.myo_ml:.1f} mL)")
        lines.extend(self.notes)
        return lines


def frame_volumes(labels: np.ndarray, spacing: Sequence[float], frame: int = 0) -> FrameVolumes:
    """Volumes of one ``(D, H, W)`` ACDC label map with voxel size ``spacing``
    (``(D, H, W)`` mm, already checked)."""
    lab = np.asarray(labels)
    counts = np.bincount(lab.ravel().astype(np.int64), minlength=4) if lab.size else np.zeros(4, np.int64)
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    myo = float(counts[MYO]) * voxel_ml
    return FrameVolumes(int(frame), float(counts[LV]) * voxel_ml, float(counts[RV]) * voxel_ml, myo,
                        myo * MYOCARDIUM_DENSITY)


def function(edv: float, esv: float) -> Function:
    """EDV, ESV, SV = EDV − ESV and EF = 100·SV/EDV (NaN when EDV is 0)."""
    sv = edv - esv
    return Function(edv, esv, sv, 100.0 * sv / edv if edv > 0 else float("nan"))


def check_labels(labels: np.ndarray, source: str = "the segmentation") -> np.ndarray:
    """``labels`` as an integer array of ACDC values 0..3, or a clear refusal."""
    lab = np.asarray(labels)
    if lab.dtype.kind == "f":
        if not np.all(np.isfinite(lab)) or not np.all(lab == np.round(lab)):
            raise M3HLInputError(f"{source} holds non-integer values; give a label map (0 background, 1 RV, "
                                 "2 Myo, 3 LV)")
        lab = lab.astype(np.int64)
    elif lab.dtype.kind not in "iub":
        raise M3HLInputError(f"{source} has data type {lab.dtype}; give a label map (integers 0..3)")
    if lab.ndim not in (3, 4):
        raise M3HLInputError(f"{source} has shape {lab.shape}; give a 3D (D, H, W) segmentation or a 4D cine "
                             "(T, D, H, W)")
    if lab.size and (lab.min() < 0 or lab.max() > LV):
        raise M3HLInputError(f"{source} holds label values {int(lab.min())}..{int(lab.max())}; measurements need "
                             "the ACDC labels 0 background, 1 RV, 2 Myo, 3 LV")
    return lab


def measure(labels: np.ndarray, spacing: Sequence[float] | None, es_labels: np.ndarray | None = None,
            ed: int | None = None, es: int | None = None, source: str = "the segmentation",
            fix: str = FIX_CLI) -> Measurements:
    """Volumes and, with two or more frames, systolic function.

    Args:
        labels: ``(D, H, W)`` (one frame) or ``(T, D, H, W)`` (a cine, or ED and
            ES stacked) ACDC label map.
        spacing: ``(D, H, W)`` voxel size in mm (checked with
            :func:`check_voxel_size`).
        es_labels: a second ``(D, H, W)`` segmentation, the end-systolic frame
            (``labels`` is then the end-diastolic one).
        ed, es: frame indices of a cine to use as ED / ES; default: the frames
            of the largest and the smallest non-zero LV volume.
        source, fix: the segmentation's name and what to do about a bad
            voxel size, for the messages.

    Raises:
        M3HLInputError: bad voxel size, labels or frame choice (one line).
    """
    vox = check_voxel_size(spacing, source, fix)
    lab = check_labels(labels, source)
    if es_labels is not None:
        es_lab = check_labels(es_labels, "the end-systolic segmentation")
        if lab.ndim != 3 or es_lab.ndim != 3:
            raise M3HLInputError(f"an end-diastolic and an end-systolic segmentation are two 3D volumes; got shapes "
                                 f"{lab.shape} and {es_lab.shape}")
        frames = [frame_volumes(lab, vox, 0), frame_volumes(es_lab, vox, 1)]
        ed, es = 0, 1
    elif lab.ndim == 3:
        return Measurements([frame_volumes(lab, vox, 0)], vox)
    else:
        frames = [frame_volumes(f, vox, t) for t, f in enumerate(lab)]
        lv = np.array([f.lv_ml for f in frames])
        if not (lv > 0).any():
            raise M3HLInputError(f"{source}: no frame holds any LV (label 3); cannot pick end-diastole and "
                                 "end-systole")
        for name, idx in (("ed", ed), ("es", es)):
            if idx is not None and not 0 <= idx < len(frames):
                raise M3HLInputError(f"{name} frame {idx} is out of range: the cine has {len(frames)} frames")
        ed = int(np.argmax(lv)) if ed is None else int(ed)
        es = int(np.argmin(np.where(lv > 0, lv, np.inf))) if es is None else int(es)
    m = Measurements(frames, vox, ed, es, function(frames[ed].lv_ml, frames[es].lv_ml),
                     function(frames[ed].rv_ml, frames[es].rv_ml))
    for name, fn in (("LV", m.lv), ("RV", m.rv)):
        if fn.edv_ml == 0:
            m.notes.append(f"no {name} at end-diastole: its EF is undefined")
        elif fn.sv_ml < 0:
            m.notes.append(f"the {name} is larger at end-systole than at end-diastole (EF {fn.ef_pct:.1f} %): "
                           "are the two frames swapped?")
    return m


def _finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_none(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _r(v: float) -> str:
    return "" if not math.isfinite(v) else f"{v:.3f}"


def _pct(v: float) -> str:
    return "undefined" if not math.isfinite(v) else f"{v:.1f} %"


def _fmt(vals: Sequence[float]) -> str:
    return " × ".join(f"{v:g}" for v in vals)

"""Seeded synthetic cardiac short-axis cine-MR phantom.

A volume is a stack of short-axis slices from the base (slice 0) to the apex
(last slice). Each slice shows:

* the body (mediastinal tissue with smooth texture, a dark muscle layer, a
  bright subcutaneous fat rim) in air;
* two dark lungs, the liver appearing toward the apex, the spine with bright
  CSF, the descending aorta (bright blood, not labeled) and, at the base, the
  ascending aorta;
* the heart: a bright LV blood pool (label 3, including two dark papillary
  muscles as in ACDC), a dark-grey myocardial ring of varying thickness
  (label 2), a bright crescent RV cavity (label 1) hugging the septum with a
  thin unlabeled free wall, and bright epicardial fat in places.

Toward the apex the LV shrinks, the myocardium thins and the RV vanishes.
Across seeds the heart position, size, orientation, shape harmonics,
intensities, bias field and noise level vary. The image gets partial-volume
blur, a smooth multiplicative bias field and Rician noise, and is min-max
scaled to [0, 1] like the ACDC data. Because blood, fat, aorta and CSF share
the bright range and myocardium, liver and muscle the grey range, a
segmentation network must use shape and context, not a threshold.

Anatomy is laid out for the default 216 x 256 grid at 1.5 mm and scales with
the in-plane size, so small grids (e.g. 64 x 64 for fast tests) still show
the whole heart.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
from scipy import ndimage

from napari_m3hl.errors import M3HLInputError

__all__ = ["Phantom", "make_phantom", "make_phantom_cohort", "save_phantom_nifti",
           "DEFAULT_SHAPE", "DEFAULT_SPACING"]

DEFAULT_SHAPE: tuple[int, int, int] = (10, 216, 256)
DEFAULT_SPACING: tuple[float, float, float] = (10.0, 1.5, 1.5)


@dataclass
class Phantom:
    """One synthetic volume.

    ``image``: float32 ``(D, H, W)`` in [0, 1]; ``label``: uint8 ``(D, H, W)``
    (0 background, 1 RV, 2 Myo, 3 LV); ``spacing``: ``(D, H, W)`` voxel size
    in mm; ``seed``: the seed it was made from. Slice 0 is basal, the last
    slice apical.
    """

    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    seed: int


def _check_shape(shape) -> tuple[int, int, int]:
    try:
        d, h, w = (int(s) for s in shape)
    except (TypeError, ValueError) as exc:
        raise M3HLInputError(f"phantom shape {shape!r} must be three integers (D, H, W).") from exc
    if d < 1 or h < 32 or w < 32:
        raise M3HLInputError(f"phantom shape {shape!r} too small: need D >= 1 and H, W >= 32 pixels.")
    return d, h, w


def _ellipse(dx: np.ndarray, dy: np.ndarray, ax, ay) -> np.ndarray:
    """Normalised elliptic radius (< 1 inside), broadcasting over the inputs."""
    return (dx / ax) ** 2 + (dy / ay) ** 2


def _paint(img: np.ndarray, mask: np.ndarray, value) -> None:
    """Set ``img`` to ``value`` where ``mask`` (broadcast to ``img``) is true."""
    np.copyto(img, np.asarray(value, dtype=img.dtype), where=mask)


def _smooth_field(rng: np.random.Generator, d: int, h: int, w: int, cell: int = 16) -> np.ndarray:
    """Smooth zero-mean, unit-ish std random field, float32 ``(d, h, w)``."""
    h0, w0 = max(2, -(-h // cell)), max(2, -(-w // cell))
    low = rng.standard_normal((d, h0, w0)).astype(np.float32)
    low = ndimage.gaussian_filter(low, (0, 0.8, 0.8), mode="wrap")
    low /= low.std() + 1e-6
    field = ndimage.zoom(low, (1, h / h0, w / w0), order=1, mode="nearest", grid_mode=True)
    return field[:, :h, :w]


def make_phantom(
    seed: int = 0,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: Optional[tuple[float, float, float]] = None,
    noise: Optional[float] = None,
    bias: Optional[float] = None,
) -> Phantom:
    """Make one seeded phantom volume.

    Parameters
    ----------
    seed:
        Random seed; equal seeds give identical volumes.
    shape:
        ``(D, H, W)``: D short-axis slices from base to apex, H x W pixels.
    spacing:
        Voxel size ``(D, H, W)`` in mm. Default: 10 mm slices and
        ``1.5 * 256 / W`` mm pixels, i.e. ``(10.0, 1.5, 1.5)`` for the
        default shape (the anatomy is scaled to the field of view).
    noise:
        Rician noise sigma relative to the blood intensity scale (~0.85);
        default: drawn in [0.02, 0.05].
    bias:
        Strength of the multiplicative bias field (std of its log, roughly);
        default: drawn in [0.08, 0.25].
    """
    d, h, w = _check_shape(shape)
    if spacing is None:
        pix = 1.5 * 256.0 / w
        spacing = (10.0, pix, pix)
    spacing = tuple(float(s) for s in spacing)  # type: ignore[assignment]
    rng = np.random.default_rng(seed)
    u = rng.uniform
    s = min(h / 216.0, w / 256.0)  # anatomy scale: default pixels -> grid pixels

    # ---- per-seed intensities
    blood = u(0.75, 0.9)
    rv_blood = blood * u(0.9, 1.05)
    myo = u(0.2, 0.3)
    tissue = u(0.32, 0.42)
    muscle = u(0.18, 0.26)
    fat = u(0.8, 0.95)
    lung = u(0.03, 0.08)
    liver = u(0.38, 0.48)
    bone = u(0.42, 0.52)
    csf = u(0.6, 0.75)
    sigma = u(0.02, 0.05) if noise is None else float(noise)
    bias_strength = u(0.08, 0.25) if bias is None else float(bias)

    # ---- per-slice geometry, arrays shaped (D, 1, 1)
    t = (np.arange(d, dtype=np.float32) / max(d - 1, 1)) if d > 1 else np.array([0.5], np.float32)
    t = t[:, None, None]
    yy = np.arange(h, dtype=np.float32)[None, :, None]
    xx = np.arange(w, dtype=np.float32)[None, None, :]

    # body
    by = h / 2 + s * u(2, 10)
    bx = w / 2 + s * u(-5, 5)
    bay = min(s * u(82, 96), h / 2 - 2)
    bax = min(s * u(108, 120), w / 2 - 2)
    q_body = _ellipse(xx - bx, yy - by, bax, bay)

    # heart centre drifts and turns slightly from base to apex
    cy0 = by - s * u(8, 20)
    cx0 = bx + s * u(-5, 12)
    cy = cy0 + s * u(-4, 4) * t + s * rng.normal(0, 0.6, (d, 1, 1))
    cx = cx0 + s * u(0, 8) * t + s * rng.normal(0, 0.6, (d, 1, 1))
    theta = np.pi + u(-0.2, 0.8) + u(-0.25, 0.25) * t  # direction LV -> RV (image x right, y down)
    ct, st = np.cos(theta), np.sin(theta)
    dx, dy = xx - cx, yy - cy
    hu = dx * ct + dy * st  # along the LV -> RV axis
    hv = -dx * st + dy * ct
    ecc = u(0.85, 1.15)
    rho = np.sqrt(hu ** 2 + (hv / ecc) ** 2) + 1e-3
    cphi, sphi = hu / rho, (hv / ecc) / rho
    p1, p2 = u(0, 2 * np.pi, 2)
    harmonic = (1 + u(0.02, 0.08) * (cphi * np.cos(p1) + sphi * np.sin(p1))
                + u(0.02, 0.07) * ((cphi ** 2 - sphi ** 2) * np.cos(p2) + 2 * cphi * sphi * np.sin(p2)))

    r_lv0 = s * u(14, 20)
    r_lv = r_lv0 * (1 - u(0.7, 0.85) * t ** u(1.3, 1.9))
    th0 = s * u(5, 8)
    th = th0 * (1 - 0.3 * t) * (1 + 0.15 * np.sin(2 * np.pi * u(0.5, 1.2) * t + u(0, 2 * np.pi)))
    q1 = u(0, 2 * np.pi)
    th_ang = th * (1 + u(0.05, 0.25) * (cphi * np.cos(q1) + sphi * np.sin(q1)))
    r_endo = r_lv * harmonic
    r_epi = r_endo + th_ang
    lv_mask = rho < r_endo
    epi_mask = rho < r_epi

    # RV: ellipse bulging beyond the epicardium on the septal side
    rv_end = u(0.65, 0.85)
    rv_scale = np.sqrt(np.clip(1 - (t / rv_end) ** 2, 0, None))
    R = r_lv + th  # mean epicardial radius per slice
    # crescent: ellipse (semi-axes a along the axis, b across) centred so it
    # reaches rv_depth beyond the epicardium; b shrinks with the depth so the
    # horns stay on the septal side and the RV vanishes when the depth does
    rv_a = R * u(0.9, 1.15)
    rv_depth = R * u(0.45, 0.8) * rv_scale
    rv_b = R * (0.75 + 0.4 * rv_scale) * u(0.95, 1.08)
    rv_uc = R + rv_depth - rv_a
    rv_wall = s * u(1.5, 2.5)
    q_rv = _ellipse(hu - rv_uc, hv, rv_a, rv_b)
    q_rv_outer = _ellipse(hu - rv_uc, hv, rv_a + rv_wall, rv_b + rv_wall)
    present = (rv_scale > 0)
    rv_mask = (q_rv < 1) & ~epi_mask & present
    rv_outer = (q_rv_outer < 1) & ~epi_mask & present & (hu > rv_uc - rv_a)  # no wall inside the LV side

    # ---- compose the image
    img = np.zeros((d, h, w), np.float32)
    texture = _smooth_field(rng, d, h, w)
    _paint(img, q_body < 1, tissue)
    _paint(img, (q_body >= 0.8) & (q_body < 0.9), muscle)
    _paint(img, (q_body >= 0.9) & (q_body < 1), fat)

    for side in (-1, 1):
        lx = bx + side * s * u(58, 70)
        ly = by + s * u(-8, 8)
        q_l = _ellipse(xx - lx, yy - ly, s * u(24, 32), s * u(38, 50)) * (1 + 0.4 * t * u(0.5, 1.0))
        _paint(img, (q_l < 1) & (q_body < 0.8), lung)
    # a few mid-bright lung vessels
    for _ in range(6):
        vx, vy = bx + s * u(-80, 80), by + s * u(-40, 40)
        _paint(img, (_ellipse(xx - vx, yy - vy, s * 2.0, s * 2.0) < 1) & (q_body < 0.8), tissue * 1.2)

    # liver appears toward the apex on the image-left (patient right), low
    liver_start = u(0.35, 0.6)
    grow = np.clip((t - liver_start) / (1 - liver_start), 0, None)
    q_liv = _ellipse(xx - (bx - s * u(25, 45)), yy - (by + s * u(30, 45)),
                     s * 70 * grow + 1e-3, s * 45 * grow + 1e-3)
    _paint(img, (q_liv < 1) & (q_body < 0.8), liver)

    # spine (bone ring + bright CSF) and descending aorta
    sx, sy = bx + s * u(-3, 3), by + bay * u(0.55, 0.65)
    q_sp = _ellipse(xx - sx, yy - sy, s * 13, s * 12)
    _paint(img, q_sp < 1, bone)
    _paint(img, _ellipse(xx - sx, yy - (sy + s * 5), s * 4.5, s * 4) < 1, csf)
    ax_, ay_ = sx + s * u(12, 22), sy - s * u(16, 22)
    _paint(img, _ellipse(xx - ax_, yy - ay_, s * u(8, 11), s * u(8, 11)) < 1, blood * u(0.9, 1.05))

    # ascending aorta / pulmonary trunk at the base, anterior-right of the LV
    asc = t < u(0.1, 0.25)
    aox = cx0 - s * u(5, 15) * np.cos(theta) - s * 10
    aoy = cy0 - R - s * u(6, 12)
    _paint(img, (_ellipse(xx - aox, yy - aoy, s * 11, s * 11) < 1) & asc, blood)

    # epicardial / pericardial fat in a sector around the heart
    fat_w = s * u(2.5, 5)
    fphi = u(0, 2 * np.pi)
    sector = (cphi * np.cos(fphi) + sphi * np.sin(fphi)) > u(-0.2, 0.4)
    _paint(img, (rho < r_epi + fat_w) & sector, fat)
    q_rv_fat = _ellipse(hu - rv_uc, hv, rv_a + rv_wall + fat_w, rv_b + rv_wall + fat_w)
    _paint(img, (q_rv_fat < 1) & present & sector, fat)

    # heart: RV wall, RV blood, myocardium, LV blood, papillary muscles
    _paint(img, rv_outer, myo)
    _paint(img, rv_mask, rv_blood)
    _paint(img, epi_mask, myo)
    _paint(img, lv_mask, blood)
    pap = np.zeros_like(lv_mask)
    mid = (t > 0.15) & (t < 0.75)
    for off in (-0.9, 0.9):
        ang = theta + np.pi + off + u(-0.2, 0.2)
        px_ = cx + 0.62 * r_lv * np.cos(ang)
        py_ = cy + 0.62 * r_lv * np.sin(ang)
        pr = np.maximum(s * u(1.8, 3.0) * (1 - t), 0.5)
        pap |= (_ellipse(xx - px_, yy - py_, pr, pr) < 1) & mid
    _paint(img, pap & lv_mask, myo * 1.1)

    # texture (flow / tissue inhomogeneity)
    img *= 1 + 0.06 * texture

    # ---- labels
    label = np.zeros((d, h, w), np.uint8)
    np.copyto(label, np.uint8(1), where=rv_mask)
    np.copyto(label, np.uint8(2), where=epi_mask)
    np.copyto(label, np.uint8(3), where=lv_mask)

    # ---- acquisition: partial volume, bias field, Rician noise, scaling
    img = ndimage.gaussian_filter(img, (0, 0.7 * s ** 0.5, 0.7 * s ** 0.5))
    yn = (yy / max(h - 1, 1)) * 2 - 1
    xn = (xx / max(w - 1, 1)) * 2 - 1
    c = rng.uniform(-1, 1, 6)
    log_b = bias_strength * (c[0] * xn + c[1] * yn + c[2] * xn * yn + c[3] * (xn ** 2 - 1 / 3)
                             + c[4] * (yn ** 2 - 1 / 3) + c[5] * (t - 0.5))
    img *= np.exp(log_b).astype(np.float32)
    n = rng.standard_normal((2, d, h, w), dtype=np.float32) * np.float32(sigma)
    img = np.sqrt((img + n[0]) ** 2 + n[1] ** 2)
    hi = np.percentile(img, 99.9)
    lo = float(img.min())
    img = (np.clip(img, lo, hi) - lo) / max(hi - lo, 1e-6)
    return Phantom(image=img.astype(np.float32), label=label, spacing=spacing, seed=int(seed))  # type: ignore[arg-type]


def make_phantom_cohort(n: int, seed: int = 0, **kwargs) -> list[Phantom]:
    """``n`` phantoms with distinct per-volume seeds derived from ``seed``.

    Keyword arguments go to :func:`make_phantom`. Cohorts with different
    ``seed`` do not share volumes (seeds come from ``numpy.random.SeedSequence``).
    """
    if int(n) < 0:
        raise M3HLInputError(f"make_phantom_cohort: n={n} must be >= 0.")
    seeds = np.random.SeedSequence(int(seed)).generate_state(int(n), dtype=np.uint32) if n else []
    return [make_phantom(seed=int(sd), **kwargs) for sd in seeds]


def save_phantom_nifti(
    path: Union[str, Path],
    seed: int = 0,
    labels_path: Optional[Union[str, Path]] = None,
    **kwargs,
) -> Phantom:
    """Write a phantom image as NIfTI (and its labels when ``labels_path``).

    The affine is axis-aligned with the phantom spacing
    (:func:`napari_m3hl.io.nifti.affine_from_spacing`); data are stored ``(X, Y, Z)``.
    Keyword arguments go to :func:`make_phantom`. Returns the phantom.
    """
    from napari_m3hl.io.nifti import affine_from_spacing, save_nifti_image, save_nifti_labels

    ph = make_phantom(seed=seed, **kwargs)
    affine = affine_from_spacing(ph.spacing)
    save_nifti_image(ph.image, path, affine)
    if labels_path is not None:
        save_nifti_labels(ph.label, labels_path, affine)
    return ph

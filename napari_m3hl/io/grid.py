"""Where a volume lies in the world: label maps moved onto their image's grid,
the slice axis and the in-plane shape checked against what the networks expect.

Arrays are ``(D, H, W)`` as :func:`napari_m3hl.io.nifti.load_nifti` returns
them (the stored NIfTI ``(X, Y, Z)`` transposed); affines map the stored
``(i, j, k)`` index to world millimetres, as stored in the file.
"""
from __future__ import annotations

import numpy as np

from napari_m3hl.errors import M3HLInputError

#: Voxel centres closer than this (in voxels) are the same voxel.
GRID_TOL = 0.01
#: A voxel axis this many times thicker than the thinnest is a through-plane axis.
THICK_RATIO = 1.5
#: In-plane sides further apart than this factor are "strongly non-square".
SQUARE_RATIO = 2.0


def _offset_text(label_affine: np.ndarray, image_affine: np.ndarray) -> str:
    d = np.asarray(label_affine, float)[:3, 3] - np.asarray(image_affine, float)[:3, 3]
    return f"origin offset ({d[0]:.1f}, {d[1]:.1f}, {d[2]:.1f}) mm"


def labels_on_image_grid(labels: np.ndarray, label_affine: np.ndarray, image_shape: tuple[int, ...],
                         image_affine: np.ndarray, name: str) -> tuple[np.ndarray, str | None]:
    """``labels`` ``(D, H, W)`` on the image's grid ``image_shape`` ``(D, H, W)``, and a message when they moved.

    The same shape and affine: returned as they are (no message). Another
    affine whose voxel centres fall on the image's voxel centres (the same
    world grid stored flipped, with its axes in another order or cropped
    differently): each image voxel takes the label of the voxel at its world
    position (nearest neighbour, exact here), and the message says so.
    Refused with :class:`M3HLInputError` naming the offset: voxel centres
    between the image's (another spacing, a shift that is not a whole number
    of voxels, a rotation), and painted voxels that fall outside the image.
    """
    lab = np.asarray(labels)
    a_lab, a_img = np.asarray(label_affine, float), np.asarray(image_affine, float)
    image_shape = tuple(int(s) for s in image_shape)
    if lab.shape == image_shape and np.allclose(a_lab, a_img, atol=1e-3):
        return lab, None
    if lab.ndim != 3 or len(image_shape) != 3:
        raise M3HLInputError(f"{name} has shape {lab.shape} but the image has {image_shape}; give labels painted "
                             "on this image (one 3D volume)")
    try:
        to_lab = np.linalg.inv(a_lab) @ a_img  # image (i, j, k) -> label (i, j, k)
    except np.linalg.LinAlgError:
        raise M3HLInputError(f"{name} has a singular affine; it cannot be placed on the image") from None
    rot, shift = to_lab[:3, :3], to_lab[:3, 3]
    perm = np.rint(rot)
    on_grid = (np.allclose(rot, perm, atol=GRID_TOL) and np.allclose(np.abs(perm).sum(0), 1)
               and np.allclose(np.abs(perm).sum(1), 1) and np.allclose(shift, np.rint(shift), atol=GRID_TOL))
    shapes = f"; shape {lab.shape}, the image's {image_shape}" if lab.shape != image_shape else ""
    where = f"{name} has a different affine from the image ({_offset_text(a_lab, a_img)}{shapes})"
    if not on_grid:
        step = np.abs(shift - np.rint(shift)).max()
        raise M3HLInputError(
            f"{where} and its voxels lie between the image's (off by {step:.2f} voxel, or another voxel size or "
            "orientation): it was painted on another image or resampled. Give labels painted on this image "
            "(e.g. napari's 'New labels layer' on it)")
    # every image voxel's index in the label array (stored (i, j, k) order)
    xyz_shape = image_shape[::-1]
    grids = np.meshgrid(*[np.arange(n) for n in xyz_shape], indexing="ij")
    idx = [np.rint(sum(perm[r, c] * grids[c] for c in range(3)) + shift[r]).astype(np.int64) for r in range(3)]
    lab_xyz = np.ascontiguousarray(lab.transpose(2, 1, 0))
    inside = np.ones(xyz_shape, bool)
    for r in range(3):
        inside &= (idx[r] >= 0) & (idx[r] < lab_xyz.shape[r])
    out_xyz = np.zeros(xyz_shape, lab.dtype)
    out_xyz[inside] = lab_xyz[tuple(i[inside] for i in idx)]
    lost = int(np.count_nonzero(lab)) - int(np.count_nonzero(out_xyz))
    if lost > 0:
        raise M3HLInputError(
            f"{where}: {lost} painted voxel(s) fall outside the image, so the labels were painted on another "
            "image. Give labels painted on this image")
    moved = np.ascontiguousarray(out_xyz.transpose(2, 1, 0))
    return moved, (f"{name} is stored on another grid than the image ({_offset_text(a_lab, a_img)}; its voxel "
                   "centres fall on the image's): moved onto the image's grid by world position (nearest neighbour, "
                   "no painted voxel lost)")


def slice_axis_warning(shape: tuple[int, ...], spacing: tuple[float, ...] | None, name: str) -> str | None:
    """A warning when the volume ``shape`` ``(D, H, W)`` with voxel ``spacing``
    (mm, same order) does not look like a stack of slices along axis 0 (the
    axis the 2D networks segment across), else None.

    Thick voxels along another axis (a short-axis stack's slices are its
    thick axis) name that axis; without thick voxels, a first axis much longer
    than the thinnest in-plane axis (an array saved without the axis
    transpose) is named too."""
    shape = tuple(int(s) for s in shape[-3:])
    if len(shape) != 3:
        return None
    axes = ("third (k)", "second (j)", "first (i)")  # NIfTI axis of data axis 0, 1, 2
    sp = np.asarray(spacing[-3:] if spacing is not None else (1.0, 1.0, 1.0), float)
    if np.all(np.isfinite(sp)) and np.all(sp > 0):
        thick = int(np.argmax(sp))
        if thick != 0 and sp[thick] > THICK_RATIO * sp[0]:
            return (f"warning: {name}: its thickest voxels ({sp[thick]:g} mm) lie along the NIfTI {axes[thick]} "
                    f"axis, but slices are taken along the {axes[0]} axis ({sp[0]:g} mm): it is segmented across "
                    "the wrong axis. Resave it with the slices along the third axis (e.g. reorient it to the "
                    "scanner's short-axis stack)")
        if sp[0] > THICK_RATIO * sp[1:].min():
            return None  # thick slices along axis 0: a stack of slices as expected
    thin = 1 + int(np.argmin(shape[1:]))
    if shape[thin] * 4 <= shape[0]:
        return (f"warning: {name}: {shape[0]} slices of {shape[1]}x{shape[2]} pixels: a short-axis stack has "
                f"fewer slices than pixels per side, so its slices may lie along the NIfTI {axes[thin]} axis (an "
                "array saved without its axis transpose?). Check the orientation in a viewer; slices are taken "
                "along the third axis")
    return None


def in_plane_warning(shape: tuple[int, ...], name: str) -> str | None:
    """A warning when the slices of ``shape`` ``(..., H, W)`` are strongly
    non-square: the 2D networks resize each slice to their square input,
    stretching it by more than ``SQUARE_RATIO``."""
    h, w = int(shape[-2]), int(shape[-1])
    if min(h, w) > 0 and max(h, w) > SQUARE_RATIO * min(h, w):
        return (f"warning: {name}: slices of {h}x{w} pixels are stretched to the network's square input "
                f"({max(h, w) / min(h, w):.1f}x in one direction) and segment badly; crop them closer to square "
                "around the heart")
    return None

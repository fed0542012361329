"""napari-m3hl: M³HL semi-supervised segmentation of cardiac MR.

The engine (this package minus ``_napari``) imports neither Qt nor napari.
"""
__version__ = "0.1.0"

"""Measures of a segmentation: overlap and surface distances of label maps and binary masks."""

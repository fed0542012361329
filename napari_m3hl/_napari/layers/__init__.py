"""napari layer control: overlay names, in-place updates, quiet adds."""

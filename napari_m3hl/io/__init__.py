"""Files: NIfTI and h5 reading and writing, input checks, intensity scaling, atomic writes, checkpoints, sessions."""

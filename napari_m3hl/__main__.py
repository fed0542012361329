"""``python -m napari_m3hl`` = the ``m3hl`` command."""
from .cli import main

raise SystemExit(main())

"""``python -m napari_m3hl`` = the ``m3hl`` command."""
from napari_m3hl.cli.main import main

raise SystemExit(main())

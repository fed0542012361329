"""The ``m3hl`` command line."""

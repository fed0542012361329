"""napari plugin layer of napari-m3hl: reader, writer, sample data, dock widget.

Only this sub-package imports napari and Qt (through ``qtpy``). Modules:

* ``_reader`` / ``_writer`` / ``_sample``: npe2 contributions (no Qt);
* ``_layers``: layer control (fixed overlay names, in-place updates, class
  colours, labelled-slice summaries, data version tokens);
* ``_jobs`` (plain worker jobs), ``_workers`` (superqt workers, error words),
  ``_run`` (``RunController``, owns the training run): the backend, running the engine in thread
  workers (training, prediction, checkpoint copy, export);
* ``_widget`` (+ ``_plot``): the "Train M³HL" dock widget layout.
"""

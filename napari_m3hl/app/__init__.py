"""The application layer shared by the command line and the widget (Qt-free): what a run will be."""

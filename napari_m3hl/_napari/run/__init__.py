"""Running jobs from the widget: the run controller, worker jobs and what their results draw."""

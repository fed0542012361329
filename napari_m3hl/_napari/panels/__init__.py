"""The dock widget's panels, one QGroupBox each, over one PanelState."""

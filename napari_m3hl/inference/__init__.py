"""Prediction: the Predictor, 2D slice-wise and 3D sliding-window inference, probability blends."""

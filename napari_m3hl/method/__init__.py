"""The method: networks, block-mask mixing, losses, the mean teacher, augmentation, connected components and one training step."""

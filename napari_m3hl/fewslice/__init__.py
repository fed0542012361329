"""The few-slice fine-tune on painted volumes, its safeguard and which slice to label next."""

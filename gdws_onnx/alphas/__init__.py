"""Per-channel error weights for allocation: noise gain (noise_gain) and forward sensitivity (forward)."""

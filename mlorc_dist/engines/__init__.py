"""Engine adapters: each turns what an engine hands the optimizer into pieces (a Layout)."""

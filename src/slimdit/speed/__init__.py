"""Speed: sampling latency, parameter and FLOP ratios of a student against its teacher, measured side by side."""

"""Image-set metrics (CMMD, FID, CLIP score) over pluggable embedders, and benchmarks."""

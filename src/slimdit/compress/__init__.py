"""Pure surgery: remove units, low-rank (SVD) layers, re-compression; plans that record what changed."""

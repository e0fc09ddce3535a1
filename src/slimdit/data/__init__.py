"""Caption datasets, the conditioning cache, teacher-generated sets."""

"""Unit importance: one scorer per file, ``(adapter, model, ...) -> {unit: score}``."""

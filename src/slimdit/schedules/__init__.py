"""Schedules: one-shot, progressive and linear progressive loops of score -> select -> compress -> train."""

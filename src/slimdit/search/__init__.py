"""Plans from scores: greedy, Optuna TPE (with the greedy answer as its first trial)."""

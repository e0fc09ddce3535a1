"""Optuna TPE search over which ``k`` units to modify (thesis section 4.2.2); the greedy answer is enqueued as
the first trial, so the search starts from it and can only improve on it."""

from __future__ import annotations

from collections.abc import Callable


def optuna_search(score: Callable[[list[str]], float], units: list[str], k: int, n_trials: int = 300,
                  prior: list[str] | None = None, seed: int = 0) -> tuple[list[str], float, list[dict]]:
    """Return (best units, its score, all trials). Duplicate picks within a trial are pruned."""
    import optuna

    if not 1 <= k <= len(units):
        raise ValueError(f"k must be between 1 and {len(units)}, got {k}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cache: dict[frozenset, float] = {}

    def objective(trial: optuna.Trial) -> float:
        picks = [trial.suggest_categorical(f"slot{i}", units) for i in range(k)]
        if len(set(picks)) < k:
            raise optuna.TrialPruned("a unit was picked twice")
        key = frozenset(picks)
        if key not in cache:
            cache[key] = score(sorted(picks, key=units.index))
        return cache[key]

    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
    if prior:
        study.enqueue_trial({f"slot{i}": u for i, u in enumerate(prior)})
    study.optimize(objective, n_trials=n_trials)
    best = sorted(study.best_params.values(), key=units.index)
    trials = [{"units": sorted(t.params.values(), key=units.index), "value": t.value, "state": t.state.name}
              for t in study.trials]
    return best, study.best_value, trials

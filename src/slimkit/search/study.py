"""The Optuna study: storage, samplers, the refusal of another run's study, the trial loop.

Storage is any Optuna RDB URL (``sqlite:///OUT/search.db`` by default; ``postgresql://...``
lets workers on several machines share one study). Running trials send heartbeats; a trial
whose worker died (SIGKILL, a lost machine) is marked failed after ``3 x heartbeat`` seconds
by the next worker that starts a trial, and re-queued once with the same parameters.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from slimkit.core.errors import ConfigError, ResumeError, SlimkitError

STUDY = "slimkit-search"
FINGERPRINT = "slimkit_fingerprint"


class StorageError(SlimkitError):
    """The study's storage cannot be reached or opened."""


def optuna() -> Any:
    """Optuna, imported on first use (an optional dependency: ``pip install slimkit[search]``)."""
    try:
        import optuna as _optuna
    except ImportError:
        raise ConfigError("slimkit search needs Optuna: pip install 'slimkit[search]' (or "
                          "pip install optuna)") from None
    _optuna.logging.set_verbosity(_optuna.logging.WARNING)
    # The heartbeat, retry and constraints APIs used here work from 3.6 to 5.x; newer
    # releases mark them experimental or deprecated (in favour of APIs 3.6 lacks).
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r".*(RetryFailedTrialCallback|failed_trial_callback|"
                                    r"constraints_func)")
    warnings.filterwarnings("ignore", category=_optuna.exceptions.ExperimentalWarning)
    return _optuna


def open_storage(url: str, heartbeat: int) -> Any:
    """An RDB storage with heartbeats, failed stale trials re-queued once.

    Raises:
        StorageError: the URL cannot be opened (naming it without its password).
    """
    opt = optuna()
    from optuna.storages import RetryFailedTrialCallback

    url = driver_url(url)
    try:
        return opt.storages.RDBStorage(
            url, heartbeat_interval=heartbeat, grace_period=3 * heartbeat,
            failed_trial_callback=RetryFailedTrialCallback(max_retry=1),
            engine_kwargs=_engine_kwargs(url))
    except Exception as exc:  # sqlalchemy/driver errors of every kind
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StorageError(f"search storage '{_safe(url)}' cannot be opened: {first}; check "
                           "the URL, that the server runs and that the database exists"
                           ) from None


def driver_url(url: str) -> str:
    """``postgresql://`` with the driver installed: SQLAlchemy 2.1 defaults to psycopg 3,
    ``slimkit[search]`` installs psycopg2."""
    import importlib.util

    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url


def _engine_kwargs(url: str) -> dict:
    if url.startswith("postgresql"):
        return {"connect_args": {"connect_timeout": 10}}
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}  # several local workers wait for the lock
    return {}


def _safe(url: str) -> str:
    """``url`` without a password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url


def make_sampler(name: str, n_objectives: int, seed: int, constraints: Callable | None,
                 amc: dict | None = None) -> Any:
    """The sampler ``name`` (auto: TPE for one objective, NSGA-II for several), seeded;
    ``amc`` holds :class:`~slimkit.search.amc.AmcSampler`'s arguments."""
    opt = optuna()
    if name == "auto":
        name = "tpe" if n_objectives == 1 else "nsga2"
    if name == "tpe":
        return opt.samplers.TPESampler(seed=seed, constraints_func=constraints,
                                       n_startup_trials=5)
    if name == "nsga2":
        return opt.samplers.NSGAIISampler(seed=seed, constraints_func=constraints,
                                          population_size=8)
    if name == "random":
        return opt.samplers.RandomSampler(seed=seed)
    from slimkit.search.amc import AmcSampler

    return AmcSampler(**(amc or {}), seed=seed)


def stored_attrs(storage: Any, name: str) -> dict | None:
    """The user attributes of study ``name`` in ``storage``, None when there is none yet.

    Raises:
        ResumeError: the study was created by another run (see :func:`open_study`).
    """
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return None
    return dict(storage.get_study_user_attrs(study_id))


def check_fingerprint(attrs: dict, name: str, fingerprint: str) -> None:
    """Refuse a study created by another run.

    Raises:
        ResumeError: its fingerprint differs from ``fingerprint``.
    """
    if FINGERPRINT in attrs and attrs[FINGERPRINT] != fingerprint:
        raise ResumeError(f"study '{name}' in the search storage was created by another run "
                          "(model, data, recipe or thread count differ); give a new --out (or "
                          "--study-name), or --overwrite to start over")


def open_study(storage: Any, name: str, directions: list[str], sampler: Any,
               fingerprint: str, describe: dict, extra: dict | None = None) -> Any:
    """Create the study, or load it when it exists and was made by the same run.

    Args:
        extra: more user attributes written when the study is created (the sensitivity
            table); a study that has them keeps its own.

    Raises:
        ResumeError: the study exists and was created for another model, data, recipe or
            thread count (its fingerprint differs), or with other objectives.
    """
    opt = optuna()
    study = opt.create_study(storage=storage, study_name=name, directions=directions,
                             sampler=sampler, load_if_exists=True)
    attrs = study.user_attrs
    if FINGERPRINT not in attrs:  # new (or a worker raced its creator: both write the same)
        for key, value in (extra or {}).items():  # before the fingerprint that marks it made
            study.set_user_attr(key, value)
        study.set_user_attr("space", describe)
        study.set_user_attr(FINGERPRINT, fingerprint)
    check_fingerprint(attrs, name, fingerprint)
    dirs = [d.name.lower() for d in study.directions]
    if dirs != directions:
        raise ResumeError(f"study '{name}' optimizes {dirs}, this search {directions}; give a "
                          "new --study-name")
    return study


def run_trials(study: Any, objective: Callable[[Any], Any], budget: int,
               sampler_for: Callable[[int], Any]) -> int:
    """Run trials until the study holds ``budget`` started ones (all workers together; an
    enqueued trial not yet started does not count, and is run first).

    Before each trial the sampler is made anew, seeded by the number of trials the study
    holds (``sampler_for(n)``): the samplers keep no state but their random generator and
    the study's history, so a resumed study proposes what the uninterrupted one would have.

    Each trial that crashes or gives NaN is recorded as failed and the search goes on.
    Between a worker's count and its new trial another worker may start one, so a study
    shared by N workers ends with at most ``budget + N - 1`` trials.

    Returns:
        How many trials this process ran.
    """
    started = tuple(s for s in optuna().trial.TrialState if s.name != "WAITING")
    ran = 0
    while (n := len(study.get_trials(deepcopy=False, states=started))) < budget:
        study.sampler = sampler_for(n)
        study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=False)
        ran += 1
    return ran


__all__ = ["STUDY", "StorageError", "check_fingerprint", "make_sampler", "open_storage",
           "open_study", "optuna", "run_trials", "stored_attrs"]

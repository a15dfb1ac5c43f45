"""``medrl tune``: Ray Tune over the RL loop, the Ray Train V2 way.

Each Tune trial runs a small driver function (:func:`_trial`) that builds the trial's
config (the base preset plus the sampled values as dotted overrides, validated like any
command line), then launches the RL loop (:func:`cluster.driver.run_rl`: samplers, reward
service, a ``TorchTrainer``). The trainer's per-iteration reports reach Tune through
``ray.tune.integration.ray_train.TuneReportCallback``, so ASHA can stop weak trials
after any iteration. Every trial improves the same base generator with the same reward
(the base run's, resolved once) in a run directory of its own, ``<run.name>-<trial id>``.

The search space is text in the config (``tune.space``), one ``key=distribution(args)``
per entry, so a sweep is a YAML preset (``configs/sweep.yaml``) and the command line can
change it. Results: ``results.csv`` (one row per trial: its values, its last and best
metric, iterations run) and ``best.yaml`` (the base config with the best trial's values:
a preset for ``medrl rl train --config``), both written atomically.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from rl.config import RLRun, TuneConfig

log = logging.getLogger(__name__)

_ENTRY = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*=\s*(uniform|loguniform|randint|choice)\((.*)\)\s*$")
#: CPU share of a trial's driver function (it only waits on its trainer)
TRIAL_CPUS = 0.01

_ARITY = {"uniform": 2, "loguniform": 2, "randint": 2}


def parse_space(entries: Sequence[str]) -> dict[str, tuple[str, tuple[Any, ...]]]:
    """``["rl.lr=loguniform(1e-4, 1e-2)", ...]`` -> ``{"rl.lr": ("loguniform", (1e-4, 1e-2))}``.

    Raises ValueError naming the entry (``tune.space[i]``) and what is wrong.
    """
    out: dict[str, tuple[str, tuple[Any, ...]]] = {}
    for i, entry in enumerate(entries):
        where = f"tune.space[{i}] ({entry!r})"
        m = _ENTRY.match(entry)
        if not m:
            raise ValueError(
                f"{where}: expected key=distribution(args) with a distribution among "
                "uniform, loguniform, randint, choice"
            )
        key, kind, raw = m.groups()
        try:
            args = ast.literal_eval(f"({raw},)") if raw.strip() else ()
        except (ValueError, SyntaxError) as exc:
            raise ValueError(f"{where}: arguments are not literals: {exc}") from None
        if kind in _ARITY:
            if len(args) != 2 or not all(isinstance(a, (int, float)) for a in args):
                raise ValueError(f"{where}: {kind} takes two numbers (low, high)")
            if not args[0] < args[1]:
                raise ValueError(f"{where}: low must be below high")
            if kind == "loguniform" and args[0] <= 0:
                raise ValueError(f"{where}: loguniform needs low > 0")
        elif not args:
            raise ValueError(f"{where}: choice needs at least one value")
        if key in out:
            raise ValueError(f"{where}: {key} appears twice in the search space")
        out[key] = (kind, tuple(args))
    return out


def to_tune_space(space: dict[str, tuple[str, tuple[Any, ...]]]) -> dict[str, Any]:
    from ray import tune

    make = {
        "uniform": lambda a: tune.uniform(*a),
        "loguniform": lambda a: tune.loguniform(*a),
        "randint": lambda a: tune.randint(*a),
        "choice": lambda a: tune.choice(list(a)),
    }
    return {key: make[kind](args) for key, (kind, args) in space.items()}


def _override(key: str, value: Any) -> str:
    if hasattr(value, "item"):  # a numpy scalar drawn by Tune
        value = value.item()
    return f"{key}={json.dumps(value)}"


def _trial(
    config: dict[str, Any],
    make_config: Callable[[list[str]], Any],
    prepare: Callable[[Any], Any],
    base_overrides: list[str],
    run_name: str,
) -> None:
    """One trial: build its config, run the RL loop, reporting every iteration to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from cluster.driver import run_rl

    trial_id = tune.get_context().get_trial_id()
    values = config["params"]
    overrides = [*base_overrides, *(_override(k, v) for k, v in values.items())]
    # make_config validates the values like a command line; prepare holds the run dir
    cfg = make_config([*overrides, f"run.name={run_name}-{trial_id}"])
    with prepare(cfg):
        run_rl(cfg, callbacks=[TuneReportCallback()])


def _scheduler(tc: TuneConfig, iterations: int) -> Any:
    """The trial scheduler ``tc.scheduler`` names: ASHA, or FIFO (every trial to the end)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if tc.scheduler != "asha":
        return FIFOScheduler()
    # iterations report 0..n-1 and the final evaluation n: max_t above n, so that ASHA never
    # stops a trial at its final report (a stopped trial's actor is killed before its
    # trainer has exported the adapter and released its placement group)
    return ASHAScheduler(
        time_attr="iteration",
        max_t=iterations + 1,
        grace_period=min(tc.grace_period, iterations),
        reduction_factor=tc.reduction_factor,
    )


def _trainable(
    cfg: RLRun,
    make_config: Callable[[list[str]], Any],
    prepare: Callable[[Any], Any],
    base: list[str],
) -> Any:
    """:func:`_trial` with its fixed arguments and its resources, as Tune runs it."""
    from ray import tune

    trainable = tune.with_parameters(
        _trial,
        make_config=make_config,
        prepare=prepare,
        base_overrides=base,
        run_name=cfg.run.name,
    )
    # the trial function only waits on its trainer: a token CPU share (Tune refuses an
    # empty resource request); the samplers, reward service and learner workers it starts
    # ask for their own
    return tune.with_resources(trainable, {"CPU": TRIAL_CPUS})


def _tuner(
    cfg: RLRun,
    space: dict[str, tuple[str, tuple[Any, ...]]],
    make_config: Callable[[list[str]], Any],
    prepare: Callable[[Any], Any],
    base: list[str],
    out: Path,
) -> Any:
    """The ``tune.Tuner`` whose trials run :func:`_trial` over ``space``; the sweep of the
    same run name restored where one was started before (its finished trials kept, its
    unfinished and failed ones run again under their run names: they resume from latest)."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    tc: TuneConfig = cfg.tune
    trainable = _trainable(cfg, make_config, prepare, base)
    name = f"tune-{cfg.run.name}"
    previous = out / "ray" / name
    if tune.Tuner.can_restore(previous):
        log.info("tune: resuming the sweep in %s (its search space and trials as saved)", previous)
        return tune.Tuner.restore(str(previous), trainable, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space={"params": to_tune_space(space)},
        tune_config=tune.TuneConfig(
            metric=tc.metric,
            mode=tc.mode,
            scheduler=_scheduler(tc, cfg.rl.iterations),
            num_samples=tc.num_samples,
            # the variant generator limits concurrency itself (Tune ignores
            # max_concurrent_trials next to a generator instance)
            search_alg=BasicVariantGenerator(
                max_concurrent=tc.max_concurrent, random_state=tc.seed
            ),
        ),
        # a retried trial reruns the same run name: its RL run resumes from ``latest``
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(out / "ray"),
            failure_config=tune.FailureConfig(max_failures=tc.max_failures),
        ),
    )


def _result_row(result: Any, tc: TuneConfig) -> dict[str, Any]:
    """One trial's row of results.csv: its values, its last and best metric, its last
    iteration and the first line of its error."""
    values = (result.config or {}).get("params", {})
    history = result.metrics_dataframe
    metric_col = history[tc.metric] if history is not None and tc.metric in history else None
    best = None
    if metric_col is not None and len(metric_col.dropna()):
        best = float(metric_col.max() if tc.mode == "max" else metric_col.min())
    last = (result.metrics or {}).get(tc.metric)
    return {
        "trial": Path(result.path).name if result.path else "",
        **values,
        f"{tc.metric}_last": last,
        f"{tc.metric}_best": best,
        "last_iteration": (result.metrics or {}).get("iteration"),
        "error": "" if result.error is None else str(result.error).splitlines()[0],
    }


def _best_row(rows: list[dict[str, Any]], tc: TuneConfig, results_csv: Path) -> dict[str, Any]:
    """The best trial by its last report, among the trials that ran furthest.

    Ranked by the last report (the final adapter's held-out reward for a trial that ran to
    the end): iteration 0 scores the untouched base adapter, the same in every trial, so a
    best-ever value would not tell trials apart. Trials that ran furthest come first: one
    that ASHA stopped early lost to another at that point, and its last value is from
    fewer iterations than the others'.
    """
    from rl.records import finite

    scored = [r for r in rows if finite(r[f"{tc.metric}_last"])]
    if not scored:
        raise RuntimeError(f"tune: no trial reported {tc.metric}; see {results_csv}")
    furthest = max(int(r["last_iteration"] or 0) for r in scored)
    finalists = [r for r in scored if int(r["last_iteration"] or 0) == furthest]
    pick = max if tc.mode == "max" else min
    return pick(finalists, key=lambda r: r[f"{tc.metric}_last"])


def run_tune(
    cfg: RLRun,
    make_config: Callable[[list[str]], Any],
    prepare: Callable[[Any], Any],
    base_overrides: Sequence[str],
    fixed_inputs: dict[str, str],
) -> dict[str, Any]:
    """Run the sweep ``cfg.tune`` over the RL loop; write results.csv and best.yaml.

    Args:
        cfg: the resolved base config (``cfg.tune``, ``cfg.rl``, ``cfg.run``).
        make_config: ``overrides -> config`` (the CLI's loader, which validates every
            value); picklable: it runs in the trial's process.
        prepare: ``config -> context manager``: holds a trial's run directory while the
            trial runs (created, locked, its resolved config written: medrl's ``open_run``).
        base_overrides: the command line's overrides, applied before the trial's values.
        fixed_inputs: ``{"rl.generator": dir, "rl.reward": spec}`` resolved from the base
            run, so every trial starts from the same generator and reward.

    Returns:
        ``{"results": path, "best": path, "best_values": {...}, "best_metric": float}``.
    """
    import ray

    from cluster.driver import ray_init
    from runfiles import hold_run_dir

    tc: TuneConfig = cfg.tune
    space = parse_space(tc.space)
    out = Path(tc.out) if tc.out else Path(cfg.run.root) / cfg.run.name / "tune"
    out = out.resolve()
    base = [*base_overrides, *(_override(k, v) for k, v in fixed_inputs.items())]
    # trials keep the driver's working directory (paths in the config stay valid)
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    with hold_run_dir(out):  # one sweep at a time writes this results folder
        started = ray_init(cfg)
        try:
            tuner = _tuner(cfg, space, make_config, prepare, base, out)
            log.info("tune: %d trials over %s", tc.num_samples, ", ".join(space))
            grid = tuner.fit()
        finally:
            if started:
                ray.shutdown()
        rows = [_result_row(result, tc) for result in grid]
        return _write_results(out, rows, cfg, list(space), make_config, base)


def _write_results(
    out: Path,
    rows: list[dict[str, Any]],
    cfg: RLRun,
    keys: list[str],
    make_config: Callable[[list[str]], Any],
    base: list[str],
) -> dict[str, Any]:
    """results.csv (``rows``) and best.yaml (the base config with the best row's values of
    ``keys``), atomically; what :func:`run_tune` returns."""
    import pandas as pd

    from runfiles import atomic_write_text
    from runfiles.config import to_dict

    tc: TuneConfig = cfg.tune
    results_csv = out / "results.csv"
    atomic_write_text(results_csv, pd.DataFrame(rows).to_csv(index=False))
    best_row = _best_row(rows, tc, results_csv)
    best_values = {k: best_row[k] for k in keys}
    best_cfg = make_config([*base, *(_override(k, v) for k, v in best_values.items())])
    best_yaml = out / "best.yaml"
    header = (
        f"# best of {len(rows)} trials of `medrl tune` (run {cfg.run.name}): "
        f"{tc.metric} {best_row[f'{tc.metric}_last']:.4g}\n"
        + "".join(f"#   {k} = {v}\n" for k, v in best_values.items())
    )
    plain = to_dict(best_cfg)  # tuples become lists, which YAML's safe dumper writes
    atomic_write_text(best_yaml, header + yaml.safe_dump(plain, sort_keys=False))
    log.info("tune: results in %s, best config in %s", results_csv, best_yaml)
    return {
        "results": results_csv,
        "best": best_yaml,
        "best_values": best_values,
        "best_metric": best_row[f"{tc.metric}_last"],
    }

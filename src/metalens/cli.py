"""The ``metalens`` command line (also ``python -m metalens``).

Errors in what the user typed (bad options, unknown names, unreadable configs, a
run folder that cannot be used) print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from metalens import __version__

DEFAULT_THREADS = 1  # measured: benchmarks/threads.py (see README)

def _cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - platforms without affinity
        return os.cpu_count() or 1


_threads_option = click.option(
    "--threads", type=click.IntRange(min=1), default=None, envvar="METALENS_THREADS", show_envvar=True,
    help=f"CPU threads for PyTorch [default: {DEFAULT_THREADS}; small meta-learning models run "
         "fastest on one thread per process].")


def _set_threads(threads: int | None) -> None:
    import torch

    if threads is not None and threads > 4 * _cpus():
        raise click.BadParameter(f"{threads} is more than 4 threads per CPU this process may use ({_cpus()}); "
                                 f"give at most {4 * _cpus()}", param_hint="'--threads'")
    torch.set_num_threads(threads or DEFAULT_THREADS)


def _collect(config_file: str | None, sets: Sequence[str]) -> dict[str, dict[str, Any]]:
    from metalens.config import SECTIONS, load_file, parse_set

    sections = load_file(config_file) if config_file else {s: {} for s in SECTIONS}
    for item in sets:
        section, key, value = parse_set(item)
        sections[section][key] = value
    return sections


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="metalens")
def cli() -> None:
    """metalens: meta-learning through every lens, scored against the Bayes-optimal oracle.

    \b
    Quick start:
      metalens list
      metalens train --task sinusoid --learner pretrain --steps 2000 --out runs/pre
      metalens eval runs/pre
      metalens tour --out runs/tour
    """


def _options(section: str, cls: type) -> None:
    """Print every option of ``cls`` as the ``--set`` that sets it, its help and what it allows."""
    from metalens.config import field_docs
    from metalens.experiments.spine import set_arg

    docs = field_docs(cls)
    if not docs:
        click.echo("  (no options)")
    for field, (default, help_, allowed) in docs.items():
        click.echo(f"  {set_arg(field, default, section)}  {help_} [{allowed}]")


@cli.command("list")
@click.argument("name", required=False)
def list_cmd(name: str | None) -> None:
    """List task families and learners, or the options of one of them (NAME; `train`: the trainer's)."""
    from metalens.registry import LEARNERS, TASKS
    from metalens.train import TrainConfig

    if name == "train":
        click.echo("train: the options of meta-training (train.* keys)")
        _options("train", TrainConfig)
        return
    if name is not None:
        entries = [("task", "task family", e) for e in TASKS if e.name == name]
        entries += [("learner", "learner", e) for e in LEARNERS if e.name == name]
        if not entries:
            raise click.UsageError(f"unknown task family or learner {name!r}; see `metalens list`")
        for section, kind, e in entries:
            click.echo(f"{e.name} ({kind}): {e.summary}")
            _options(section, e.cls.Config)
        return
    click.echo("Task families:")
    for e in TASKS:
        click.echo(f"  {e.name:<14} {e.summary}")
    click.echo("Learners:")
    for e in LEARNERS:
        click.echo(f"  {e.name:<14} {e.summary}")
    click.echo("\n`metalens list NAME` shows the options of one of them; `metalens list train` the trainer's.")


@cli.command()
@click.option("--task", help="task family (see `metalens list`).")
@click.option("--learner", help="learner (see `metalens list`).")
@click.option("--steps", type=click.IntRange(min=1), help="meta-training steps (train.steps).")
@click.option("--seed", type=click.IntRange(min=0), help="seed of the run (train.seed).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="run folder to create (or to continue with --resume).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="TOML file with [task], [learner], [train] tables.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="override an option: task.*, learner.* or train.* (repeatable), e.g. --set task.shots=5.")
@click.option("--resume", is_flag=True, help="continue the run in --out from its newest checkpoint.")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="processes to train data-parallel over tasks (torch.distributed: gloo on CPU, NCCL on CUDA); "
                   "train.batch_tasks must be divisible by it. For several nodes use torchrun (see docs/cli.md).")
@click.option("--quiet", is_flag=True, help="no progress bar.")
@_threads_option
def train(task: str | None, learner: str | None, steps: int | None, seed: int | None, out: Path,
          config_file: str | None, sets: tuple[str, ...], resume: bool, nproc: int, quiet: bool,
          threads: int | None) -> None:
    """Meta-train a learner on a task family into a run folder."""
    import torch

    from metalens import checkpoint, distributed
    from metalens.run import RunConfig, open_run, resume_config, train_worker
    from metalens.train import check_device

    _set_threads(threads)
    sec = _collect(config_file, sets)
    if sec["study"]:
        raise click.UsageError("train --set accepts task.*, learner.* and train.* options only")
    task = task or sec["task"].pop("name", None)
    learner = learner or sec["learner"].pop("name", None)
    sec["task"].pop("name", None)
    sec["learner"].pop("name", None)
    if steps is not None:
        sec["train"]["steps"] = steps
    if seed is not None:
        sec["train"]["seed"] = seed
    if resume:  # continue as configured: the saved configuration with what was given changed
        cfg = resume_config(out, task=task, learner=learner, task_options=sec["task"],
                            learner_options=sec["learner"], train_options=sec["train"])
    elif task is None or learner is None:
        raise click.UsageError("--task and --learner are required (or name them in --config)")
    else:
        cfg = RunConfig.resolve(task, learner, sec["task"], sec["learner"], sec["train"])
    progress = None if not quiet else False
    check_device(cfg.train.device)  # before the run folder is touched
    under_torchrun = distributed.init_from_env(cfg.train.device)
    if nproc > 1 and under_torchrun:
        raise click.UsageError("--nproc cannot be combined with torchrun; let torchrun start the processes")
    world = nproc if nproc > 1 else distributed.world().size
    if cfg.train.batch_tasks % world:
        raise click.UsageError(f"train.batch_tasks ({cfg.train.batch_tasks}) must be divisible by the number "
                               f"of processes ({world})")
    t0 = time.perf_counter()
    with open_run(cfg, out, resume=resume) as run:
        if not quiet and distributed.world().is_writer:  # the effective settings, once, before the first step
            from metalens.config import to_dict
            from metalens.run import family_train_defaults

            proposed = set() if resume else set(family_train_defaults(cfg.task, cfg.task_config)) - set(sec["train"])

            def shown(options: dict[str, Any], marked: frozenset[str] | set[str] = frozenset()) -> str:
                return " ".join(f"{k}={json.dumps(v, separators=(',', ':'))}"
                                + (f" (proposed by {cfg.task})" if k in marked else "") for k, v in options.items())

            click.echo(f"metalens: task {cfg.task}: {shown(cfg.task_options)}\n"
                       f"metalens: learner {cfg.learner}: {shown(cfg.learner_options)}\n"
                       f"metalens: train: {shown(to_dict(cfg.train), proposed)}", err=True)
        if nproc > 1:
            distributed.launch(nproc, train_worker, (cfg, str(out), resume, progress),
                               device=cfg.train.device, threads=torch.get_num_threads(), run_dir=out)
            metrics = checkpoint.load(checkpoint.latest(out)).state.get("metrics", {})
        else:
            metrics = run.train(resume=resume, progress=progress).last_metrics
    if distributed.world().is_writer:
        last = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        how = f" on {world} processes" if world > 1 else ""
        click.echo(f"trained {cfg.learner} on {cfg.task}{how}: {cfg.train.steps} steps in {time.perf_counter() - t0:.1f}s"
                   + (f" (last: {last})" if last else "") + f"; run folder {out}")
        click.echo(f"evaluate it with: metalens eval {out}")


@cli.command("eval")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--episodes", type=click.IntRange(min=2), help="held-out tasks [default: 600 classification, 1000 regression].")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="evaluation seed.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="change an evaluation-time option, e.g. task.shots=5 or learner.finetune_steps=20.")
@click.option("--batch-tasks", type=click.IntRange(min=1), default=100, show_default=True,
              help="tasks scored at once (memory only; results do not depend on it).")
@click.option("--json", "as_json", is_flag=True, help="print exactly one JSON object on stdout.")
@_threads_option
def eval_cmd(run_dir: Path, episodes: int | None, seed: int, sets: tuple[str, ...], batch_tasks: int,
             as_json: bool, threads: int | None) -> None:
    """Evaluate a trained run on held-out tasks, beside the oracle on the same tasks."""
    from metalens.report import metrics_table
    from metalens.run import load_run

    _set_threads(threads)
    sec = _collect(None, sets)
    if sec["train"] or sec["study"]:
        raise click.UsageError("eval --set accepts task.* and learner.* options only")
    run = load_run(run_dir, task_options=sec["task"], learner_options=sec["learner"])
    ev = run.evaluate(episodes=episodes, seed=seed, batch_tasks=batch_tasks, progress=not as_json and sys.stderr.isatty())
    if as_json:
        click.echo(json.dumps(ev.to_json()))
    else:
        click.echo(metrics_table([ev]))
        if ev.diverged:
            click.echo(f"diverged: {ev.diverged} of {ev.episodes} held-out tasks (non-finite predictions); the "
                       f"metrics above are over the other {ev.scored} tasks, the oracle's on the same tasks")


@cli.command("certify")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--tasks", type=int, default=1000, show_default=True,
              help="n: the bound rests on the run's first n meta-training tasks (their support sets).")
@click.option("--delta", type=float, default=0.05, show_default=True,
              help="the bound holds with probability at least 1 - delta; in (0, 1).")
@click.option("--episodes", type=int, default=1000, show_default=True,
              help="fresh held-out tasks the risk is measured on (evaluation seed 0).")
@click.option("--samples", type=int, default=20000, show_default=True,
              help="Monte Carlo weight draws for the observed tasks' empirical Gibbs risk.")
@click.option("--clip", type=float, default=None,
              help="regression: B, squared errors are clipped to [0, B] [default: the learner's clip, else 4].")
@click.option("--json", "as_json", is_flag=True, help="print exactly one JSON object on stdout.")
@_threads_option
def certify_cmd(run_dir: Path, tasks: int, delta: float, episodes: int, samples: int, clip: float | None,
                as_json: bool, threads: int | None) -> None:
    """A PAC-Bayes meta-bound on a run's risk on new tasks (pacbayes; maml and protonet softened), beside the
    risk measured on fresh tasks."""
    from metalens.certify import certify

    _set_threads(threads)
    cert = certify(run_dir, tasks=tasks, delta=delta, episodes=episodes, samples=samples, clip=clip)
    click.echo(json.dumps(cert.to_json()) if as_json else cert.text())


@cli.command("tour")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/tour"),
              show_default=True, help="folder for the runs and the report.")
@click.option("--learner", "learners", multiple=True, help="only these learners (repeatable).")
@click.option("--episodes", type=click.IntRange(min=2), help="held-out tasks per learner [default: 1000 / 600].")
@click.option("--steps-scale", type=float, default=1.0, show_default=True,
              help="multiply every training budget (e.g. 0.05 for a quick look).")
@click.option("--quiet", is_flag=True, help="no progress bars.")
@_threads_option
def tour_cmd(out: Path, learners: tuple[str, ...], episodes: int | None, steps_scale: float, quiet: bool,
             threads: int | None) -> None:
    """Meta-train and evaluate every learner on its canonical family; write a report (the study `tour`)."""
    from metalens.config import ConfigError, from_dict
    from metalens.experiments.tour import Tour
    from metalens.registry import LEARNERS

    for name in learners:
        LEARNERS[name]  # unknown names fail before any work
    options: dict[str, Any] = {"steps_scale": steps_scale, "episodes": episodes}
    if learners:
        options["learners"] = list(learners)
    try:
        config = from_dict(Tour.Config, options, prefix="--", where="tour")
    except ConfigError as e:
        raise ConfigError(str(e).replace("--steps_scale", "--steps-scale")) from None
    _set_threads(threads)
    Tour(config).run(out, progress=None if not quiet else False, echo=click.echo)


@cli.command("predict")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--support", required=True, type=click.Path(path_type=Path),
              help="the labelled examples: a folder <label>/<images>, or a CSV file (feature columns and a label or "
                   "target column).")
@click.option("--query", "queries", required=True, multiple=True, type=click.Path(path_type=Path),
              help="what to predict: a folder of images, image files (repeatable), or a CSV file of features.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="write the predictions to this file (atomically) instead of stdout.")
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True,
              help="one row per query (csv) or one JSON object.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="an evaluation-time learner option, e.g. --set learner.eval_inner_steps=5 (repeatable).")
@click.option("--query-batch", type=click.IntRange(min=1),
              help="queries predicted together [default: all]; 1 predicts each on its own (see docs/use.md).")
@_threads_option
def predict_cmd(run: Path, support: Path, queries: tuple[Path, ...], out: Path | None, fmt: str,
                sets: tuple[str, ...], query_batch: int | None, threads: int | None) -> None:
    """Predict labels (or values) of queries from a labelled support set with a trained learner (RUN: a run
    folder or a model file)."""
    from metalens.use import predict_files, write_output

    _set_threads(threads)
    sec = _collect(None, sets)
    if sec["task"] or sec["train"] or sec["study"]:
        raise click.UsageError("predict --set accepts learner.* options only")
    text, n = predict_files(run, support, queries, fmt=fmt, learner_options=sec["learner"], query_batch=query_batch)
    if out is None:
        click.echo(text, nl=False)
    else:
        write_output(out, text)
        click.echo(f"wrote {n} predictions to {out}")


@cli.command("export")
@click.argument("run", type=click.Path(path_type=Path))
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def export_cmd(run: Path, file: Path) -> None:
    """Write the learner of a run folder (its newest checkpoint) as one portable model file (safetensors, no
    pickle) that `predict`, the estimators and metalens.load_model read."""
    from metalens.model_file import export

    model, size = export(run, file)
    click.echo(f"wrote {file} ({size} bytes): {model.name}, step {model.step}; use it with: "
               f"metalens predict {file} --support S --query Q")


@cli.command("study")
@click.argument("name", required=False)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="folder for the study's runs and report [default: runs/study-NAME].")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="a study option, e.g. --set study.steps=500 (see `metalens study NAME --help-options`).")
@click.option("--help-options", is_flag=True, help="list the study's options and exit.")
@click.option("--device", default="cpu", show_default=True,
              help="torch device the study's runs train and are scored on, e.g. cuda.")
@click.option("--quiet", is_flag=True, help="no progress bars.")
@_threads_option
def study_cmd(name: str | None, out: Path | None, sets: tuple[str, ...], help_options: bool, device: str,
              quiet: bool, threads: int | None) -> None:
    """Run one of the literature's experiments (NAME) and write its report; no NAME lists them."""
    from metalens.config import from_dict
    from metalens.registry import STUDIES
    from metalens.train import check_device

    if name is None:
        click.echo("Studies (metalens study NAME --out DIR):")
        for e in STUDIES:
            click.echo(f"  {e.name:<22} {e.summary}")
        return
    entry = STUDIES[name]
    if help_options:
        click.echo(f"{name}: {entry.summary}")
        _options("study", entry.cls.Config)
        return
    sec = _collect(None, sets)
    if sec["task"] or sec["learner"] or sec["train"]:
        raise click.UsageError("study --set accepts study.* options only")
    config = from_dict(entry.cls.Config, sec["study"], prefix="study.", where=f"study {name!r}")
    _set_threads(threads)
    check_device(device)
    out = out or Path(f"runs/study-{name}")
    entry.cls(config, device=device).run(out, progress=None if not quiet else False, echo=click.echo)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the CLI; every failure is one line on stderr and an exit code.

    2 for bad input (options, config files, run folders, data), 1 for a run that failed while
    running (divergence, a full disk, a dead process, an unexpected error), ``128 + signal`` after
    SIGINT, SIGTERM or SIGHUP. ``--debug`` (anywhere on the line) or ``METALENS_DEBUG=1`` shows
    the traceback instead.
    """
    from metalens.errors import Interrupted, MetalensError

    prog = "metalens"
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("METALENS_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]

    def fail(message: str, code: int) -> int:
        from metalens.distributed import world

        if world().is_writer:  # under torchrun, one rank speaks for all
            click.echo(" ".join(message.split()), err=True)
        return code

    restore = _stop_on_signals()
    try:
        rv = cli.main(args=args, prog_name=prog, standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except click.UsageError as e:
        if debug:
            raise
        cmd = f" {e.ctx.info_name}" if e.ctx is not None and e.ctx.parent is not None else ""
        return fail(f"{prog}{cmd}: error: {e.format_message()}", 2)
    except Interrupted as e:
        return fail(f"{prog}: {e}", e.exit_code)
    except MetalensError as e:
        if debug:
            raise
        return fail(f"{prog}: {'error: ' if e.exit_code == 2 else ''}{e}", e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        return fail(f"{prog}: interrupted", 130)
    except click.ClickException as e:
        return fail(f"{prog}: error: {e.format_message()}", e.exit_code)
    except BrokenPipeError:  # e.g. `metalens list | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except MemoryError:
        if debug:
            raise
        return fail(f"{prog}: ran out of memory; lower train.batch_tasks, the model's size or --batch-tasks", 1)
    except OSError as e:
        if debug:
            raise
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        return fail(f"{prog}: {e.strerror or e}{where}", 1)
    except Exception as e:  # noqa: BLE001 - the boundary: one line, and the traceback on request
        if debug:
            raise
        if isinstance(e, RuntimeError) and "out of memory" in str(e).lower():
            return fail(f"{prog}: ran out of memory ({str(e)[:120]}); lower train.batch_tasks, the model's size "
                        "or --batch-tasks", 1)
        return fail(f"{prog}: internal error: {type(e).__name__}: {str(e)[:300]} (run again with --debug for "
                    "the traceback, and please report it)", 1)
    finally:
        restore()


def _stop_on_signals() -> Any:
    """Make SIGTERM and SIGHUP stop a command like Ctrl-C does, with their own exit code (128 + signal);
    training replaces this with a graceful stop after the current step (see :mod:`metalens.train`).
    Returns a function that restores the previous handlers."""
    import signal
    import threading

    from metalens.errors import Interrupted

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def stop(signum: int, frame: Any) -> None:
        raise Interrupted(f"stopped by {signal.Signals(signum).name}", signum)

    signals = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None]
    previous = {s: signal.signal(s, stop) for s in signals}

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    return restore


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""DeepSpeed checkpoints of the training job: written atomically, resumed from the latest complete one.

A job can be killed at any moment (a pre-empted or timed-out Slurm job, a failed node), also halfway
through writing a checkpoint, so a tag directory only counts once it is known to be whole:

1. every rank writes its partition with ``engine.save_checkpoint(OUTPUT_DIR/checkpoints, tag="step{N}",
   save_latest=False)`` (DeepSpeed's own ``latest`` would name the tag before anyone checked it);
2. each rank flushes its share of the tag's files to disk, then a barrier;
3. rank 0 writes the completion marker ``step{N}/lemo_ds_complete.json`` (with every file's size and
   SHA-256, hashed by the ranks that flushed them), then points ``latest`` at the tag; both by write-to-temp,
   fsync, ``os.replace``, fsync of the directory (lemo_ds.atomic_io), so each is old or new, never torn; then it
   deletes the tags beyond ``--keep-checkpoints`` (lemo_ds.training.retention).

Nothing non-finite is saved: a save first checks the trainable weights (lemo_ds.training.finite). A save the
disk refuses (no space left, quota, file too large), or that fails otherwise on any one rank, stops every rank
with the same line naming the rank and the cause; ``latest`` is untouched.

Resuming takes ``latest`` if it names a complete tag, else the newest complete tag; tags without the marker
are ignored and reported. The candidate's files are checked against its marker first; a damaged one is named
and the next newest complete tag is tried. A checkpoint written by another number of ranks (ZeRO partitions are
per rank) loads through DeepSpeed's universal checkpoint, converted once into its tag (lemo_ds.training.universal);
one of another model or LoRA rank is refused (the marker records the run's settings). The client state carries
what the engine does not know: the step and how many global rows of the packed data stream were consumed (the
global row order does not depend on the number of ranks), so a resumed run continues the data exactly where the
checkpoint left it, on any number of ranks (model, optimizer, LR
scheduler and ``engine.global_steps``, which drives the lemo keep-ratio schedule, come back with the engine).
``--lr`` on resume replaces the restored rate (``set_lr_after_resume``).

With lemo's predictor scorer the tag also holds the predictors, which live outside the model and so outside
DeepSpeed's files: rank 0 writes ``lemo_predictors.safetensors`` (a predictors file, which ``--predictor`` also
reads) and ``lemo_predictors_state.pt`` (each layer's Adam state, the observations, the refresh schedule) before
``save_checkpoint``, after the refresh queued in the step just taken has trained (``PredictorScorer.save_checkpoint``);
every rank restores them after loading (``restore_predictors``), so the resumed job neither calibrates again nor
selects differently from an uninterrupted run.

A save that fails removes what it wrote of its tag (never a complete one), so a full disk gets its space back and
no half-written tag stays behind.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lemo_ds import atomic_io, distributed
from lemo_ds.predictors.scorer import CHECKPOINT_BANK, bound_predictor_scorer, checkpoint_saved
from lemo_ds.training import checkpoint_files, finite, output_dir, retention, universal
from lemo_ds.training.errors import TrainingSetupError, TrainingStopped

LATEST = "latest"
COMPLETE = "lemo_ds_complete.json"
AUTO = "auto"  # --resume auto: resume if a complete checkpoint exists, else start fresh (a requeued job)
_MUST_MATCH = ("seq_len", "seed", "data", "model", "lora_r")
# Of those, the ones that shape the saved weights: a checkpoint cannot load into another model or LoRA rank.
_SAME_WEIGHTS = {"model": "--model", "lora_r": "--lora-r"}
# A probe write after a failed save tells a full disk (or quota, or size limit) from any other failure.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_PROBE_BYTES = 1 << 20


@dataclass(frozen=True)
class Found:
    """What a checkpoint folder holds: the tag to resume from (None: nothing complete) and the tags to skip."""

    tag: str | None
    step: int | None = None
    incomplete: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    # Complete tags in the order to try them (``tag`` first, then newest first) and their markers.
    candidates: tuple[str, ...] = ()
    markers: dict[str, dict] | None = None


def find_checkpoint(ckpt_dir: Path) -> Found:
    """The tag to resume from: ``latest`` if it names a complete tag, else the newest complete one.

    Local reads only (no collective), so it can run before the process group exists.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return Found(None)
    markers, incomplete = _scan(ckpt_dir)
    complete = {tag: int(marker["step"]) for tag, marker in markers.items()}
    notes = []
    latest = _read_latest(ckpt_dir)
    if latest is not None and latest not in complete:
        notes.append(f"'{LATEST}' names {latest!r}, which is not a complete checkpoint")
    if not complete:
        return Found(None, None, tuple(incomplete), tuple(notes))
    newest_first = sorted(complete, key=lambda name: (complete[name], name), reverse=True)
    tag = latest if latest in complete else newest_first[0]
    order = (tag, *(name for name in newest_first if name != tag))
    return Found(tag, complete[tag], tuple(incomplete), tuple(notes), order, {name: markers[name] for name in order})


def require_checkpoint(ckpt_dir: Path, found: Found | None = None) -> None:
    """--resume without a complete checkpoint to resume from is an error (checked before any collective).
    ``found``: ``find_checkpoint(ckpt_dir)`` where the caller has it (each of these checks scans otherwise)."""
    found = find_checkpoint(ckpt_dir) if found is None else found
    if found.tag is not None:
        return
    stopped = output_dir.stopped_run(Path(ckpt_dir).parent)
    if stopped is not None:
        raise TrainingSetupError(
            f"--resume: no checkpoint in {ckpt_dir}: the earlier run {output_dir.describe_stop(stopped)} before its "
            "first checkpoint; run the same command without --resume (it starts over from step 0)"
        )
    if found.incomplete:
        raise TrainingSetupError(
            f"--resume: no complete checkpoint in {ckpt_dir} ({_describe_incomplete(found.incomplete)}); "
            "run without --resume to start over, or use --resume auto"
        )
    raise TrainingSetupError(
        f"--resume: no checkpoint in {ckpt_dir}; run without --resume first (or with --resume auto), or point "
        "--output-dir at the run to continue"
    )


def universal_config(
    ckpt_dir: Path, world_size: int, ds_config: dict[str, Any], found: Found | None = None
) -> dict[str, Any]:
    """``ds_config`` as the engine must be built to resume ``ckpt_dir`` on ``world_size`` ranks (checked before any
    collective): a checkpoint saved by another number of ranks loads through DeepSpeed's universal checkpoint
    (lemo_ds.training.universal), which DeepSpeed's ``"checkpoint": {"load_universal": true}`` turns on."""
    found = find_checkpoint(ckpt_dir) if found is None else found
    saved = found.markers[found.tag].get("world_size") if found.tag is not None else None
    if not isinstance(saved, int) or saved == world_size:
        return ds_config
    stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
    if stage == 0:
        raise TrainingSetupError(
            f"--resume: {Path(ckpt_dir) / found.tag} was saved by {saved} ranks but this job has {world_size}, and "
            "without ZeRO (zero_optimization.stage 0) DeepSpeed cannot convert it to a universal checkpoint; resume "
            f"it on {saved} ranks, or train with ZeRO stage 1, 2 or 3"
        )
    return {**ds_config, "checkpoint": {**(ds_config.get("checkpoint") or {}), "load_universal": True}}


def require_same_weights(ckpt_dir: Path, job: Any, found: Found | None = None) -> None:
    """The checkpoint to resume holds this job's model and LoRA rank (checked before any collective: DeepSpeed would
    fail inside load_checkpoint on every rank). Markers from before lemo_ds recorded settings are not checked."""
    found = find_checkpoint(ckpt_dir) if found is None else found
    if found.tag is None:
        return
    settings = found.markers[found.tag].get("settings") or {}
    for key, flag in _SAME_WEIGHTS.items():
        if key in settings and settings[key] != getattr(job, key):
            raise TrainingSetupError(
                f"--resume: {Path(ckpt_dir) / found.tag} was trained with {flag} {settings[key]} and this run has "
                f"{flag} {getattr(job, key)}; resume with {flag} {settings[key]}, or start a new run in another "
                "--output-dir"
            )


def next_run_advice(ckpt_dir: Path) -> str:
    """How to go on after a stop: continue the checkpoint there is, or run again from step 0 where there is none."""
    if find_checkpoint(ckpt_dir).tag is not None:
        return "continue with --resume"
    return "run the same command again (it starts over from step 0)"


def set_lr_after_resume(engine: Any, lr: float) -> tuple[float, float]:
    """Make ``lr`` (--lr given on resume) the learning rate from the next step on; returns (the rate the checkpoint
    had restored for that step, the rate now).

    DeepSpeed's load_checkpoint restores the optimizer's param groups, learning rate included, and the scheduler's
    position (its state is only ``last_batch_iteration``). The scheduler itself was built from this run's config,
    where --lr already set the peak (optimizer lr, WarmupLR's warmup_max_lr): it only rewrites the groups' rate at
    the end of the next step, after the restored rate has been used once. So the groups get the scheduler's rate
    for its restored position now (without a scheduler: ``lr`` itself)."""
    from deepspeed.runtime.lr_schedules import get_torch_optimizer, update_lr

    groups = get_torch_optimizer(engine.optimizer).param_groups
    before = float(groups[0]["lr"])
    scheduler = engine.lr_scheduler
    rates = scheduler.get_lr() if scheduler is not None and hasattr(scheduler, "get_lr") else [lr] * len(groups)
    rates = update_lr(groups, rates)
    if scheduler is not None and hasattr(scheduler, "_last_lr"):
        scheduler._last_lr = rates  # what get_last_lr reports until the next step
    return before, float(rates[0])


def _check_world_size(tag_dir: Path, marker: dict, world_size: int) -> None:
    """Without the universal load (the job was set up for a tag of this size), a tag of another size cannot load: the
    case of an older tag taken because a newer one of this size is damaged."""
    saved = marker.get("world_size")
    if isinstance(saved, int) and saved != world_size:
        raise TrainingSetupError(
            f"--resume: {tag_dir} was saved by {saved} ranks but this job has {world_size} (and was set up for a "
            "checkpoint of its own size, which is damaged); run the same command again: the resume then converts "
            f"{tag_dir.name} to DeepSpeed's universal checkpoint"
        )


def save(engine: Any, ckpt_dir: Path, step: int, rows_consumed: int, job: Any, keep: int = 0) -> None:
    """Write checkpoint ``step{N}`` (a collective: every rank calls it), mark it complete, point ``latest`` at it,
    then keep only the newest ``keep`` complete tags (0: all). ``job``: the job's settings (``_MUST_MATCH``).

    A failure on any rank stops every rank (TrainingStopped naming the rank and the cause): the ranks exchange
    verdicts where they would exchange the manifest, so none is left waiting in a collective for one that gave up.
    """
    ckpt_dir = Path(ckpt_dir)
    tag = f"step{step}"
    tag_dir = ckpt_dir / tag
    rank, world_size = _rank_and_size()
    if not finite.trainable_weights_finite(engine):
        raise TrainingStopped(
            f"the weights hold NaN or inf after step {step}; not saving {tag_dir} ({latest_note(ckpt_dir)}); "
            f"lower --lr (or check the data), then {next_run_advice(ckpt_dir)}"
        )
    scorer = bound_predictor_scorer(engine)
    if scorer is not None:
        scorer.train_pending()  # every rank (it all-reduces): the refresh queued in this step is in the save
    if rank == 0:
        # Overwriting a tag (a run restarted in the same folder): it is incomplete until its new marker lands.
        # The verdict exchange below is a barrier, so no rank writes into the folder before this removal.
        (tag_dir / COMPLETE).unlink(missing_ok=True)
    # Every rank makes the tag's folder and the ranks compare verdicts before save_checkpoint: inside it, rank 0
    # alone makes the folder before its first barrier, and a rank 0 that failed there would leave the others
    # waiting in collectives it never reaches. Rank 0 writes the predictors there too (every rank holds the same):
    # a failure stops every rank here, and the marker's manifest covers them.
    failure = None
    try:
        tag_dir.mkdir(parents=True, exist_ok=True)
        if scorer is not None and rank == 0:
            scorer.save_checkpoint(tag_dir, {"checkpoint_step": step})
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error type; every failure must be told
        failure = _failure(error, tag_dir)
    _stop_on_failures(_gather(failure), tag_dir)
    state = {"step": step, "rows_consumed": rows_consumed, **state_settings(job)}
    try:
        # save_latest=False: DeepSpeed would write 'latest' itself, without fsync and before the marker.
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"lemo_ds_train": state}, save_latest=False)
    except (OSError, RuntimeError) as error:
        failure = _failure(error, tag_dir)
        if world_size > 1:
            # The files are written between save_checkpoint's collectives and its closing barrier, where the other
            # ranks now wait: meet them there.
            torch.distributed.barrier()
    if failure is None:
        try:
            # The marker must not reach the disk before the data it vouches for: every rank flushes and hashes a
            # share of the files (all ranks see the same list: save_checkpoint ends with a barrier).
            files = sorted(path for path in tag_dir.rglob("*") if path.is_file())
            for path in files[rank::world_size]:
                atomic_io.fsync(path)
            share = checkpoint_files.manifest_share(tag_dir, files, rank, world_size)
        except (OSError, RuntimeError) as error:
            failure = _failure(error, tag_dir)
    verdicts = _gather(failure if failure is not None else share)  # also the barrier before the marker
    _stop_on_failures(verdicts, tag_dir)
    failure = None
    if rank == 0:
        try:
            manifest = {name: entry for part in verdicts for name, entry in part.items()}
            for folder in sorted({path.parent for path in files}, reverse=True):
                atomic_io.fsync(folder)
            marker = {"tag": tag, "step": step, "rows_consumed": rows_consumed, "world_size": world_size,
                      "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "settings": state_settings(job),
                      "files": manifest}  # fmt: skip
            atomic_io.write_text_atomic(tag_dir / COMPLETE, json.dumps(marker, indent=2) + "\n")
            atomic_io.write_text_atomic(ckpt_dir / LATEST, tag)
            markers, incomplete = _scan(ckpt_dir)
            complete = {name: int(found["step"]) for name, found in markers.items()}
            for doomed in retention.tags_to_delete(complete, incomplete, tag, keep):
                retention.delete_tag(ckpt_dir / doomed, COMPLETE, atomic_io.fsync)
        except OSError as error:
            failure = _failure(error, tag_dir)
    # Rank 0's marker, 'latest' and pruning: the others learn how it went before they train on.
    _stop_on_failures([_from_rank0(failure)], tag_dir)


def state_settings(job: Any) -> dict[str, Any]:
    """The run's settings a checkpoint records (``_MUST_MATCH``), for the resume checks."""
    return {key: getattr(job, key) for key in _MUST_MATCH}


@dataclass(frozen=True)
class _Failure:
    """One rank's failed share of a save, as it travels to the other ranks."""

    rank: int
    cause: str
    disk_full: bool


def _failure(error: BaseException, tag_dir: Path) -> _Failure:
    """What went wrong on this rank: where the disk refused the save (torch.save only says "unexpected pos"), its
    errno and file; else the error itself."""
    cause = error if isinstance(error, OSError) and error.errno in _DISK_FULL else _probe_write(tag_dir)
    rank = _rank_and_size()[0]
    if cause is None:
        return _Failure(rank, f"{type(error).__name__}: {error}", disk_full=False)
    where = cause.filename or tag_dir
    return _Failure(rank, f"{os.strerror(cause.errno)} ({errno.errorcode[cause.errno]}) on {where}", disk_full=True)


def _stop_on_failures(verdicts: list, tag_dir: Path) -> None:
    """Every rank raises the same TrainingStopped when any rank's verdict is a failure; 'latest' is untouched."""
    failures = [verdict for verdict in verdicts if isinstance(verdict, _Failure)]
    if not failures:
        return
    # A torch.save cut short by a full disk leaves its file open, held by the exception's reference cycle until the
    # cyclic collector runs: collect now, so that the space of the files removed below comes back at once (rank 0's
    # summary.json of the stop needs it).
    gc.collect()
    if _rank_and_size()[0] == 0:
        _discard_incomplete(tag_dir)  # every rank is past its writes: the verdicts were exchanged
    causes = "; ".join(f"{failure.cause} (rank {failure.rank})" for failure in failures)
    then = next_run_advice(tag_dir.parent)
    advice = (
        f"free space (or pass a smaller --keep-checkpoints) and {then}"
        if any(failure.disk_full for failure in failures)
        else f"fix that and {then}"
    )
    raise TrainingStopped(f"saving checkpoint {tag_dir} failed: {causes}; {latest_note(tag_dir.parent)}; {advice}")


def _discard_incomplete(tag_dir: Path) -> None:
    """Remove what a failed save wrote of ``tag_dir`` (no resume reads a tag without its marker), so that a full
    disk gets that space back; a tag whose marker landed is complete and stays."""
    if not (tag_dir / COMPLETE).exists():
        shutil.rmtree(tag_dir, ignore_errors=True)


def _probe_write(folder: Path) -> OSError | None:
    """Write a little more into ``folder``: the OSError if the disk refuses it with ENOSPC/EDQUOT/EFBIG."""
    probe = folder / f".lemo_ds_space_probe.{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"\0" * _PROBE_BYTES)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        return error if error.errno in _DISK_FULL else None
    finally:
        probe.unlink(missing_ok=True)
    return None


def latest_note(ckpt_dir: Path) -> str:
    latest = _read_latest(ckpt_dir)
    return f"'{LATEST}' still names {latest}" if latest else "no complete checkpoint yet"


def load(engine: Any, ckpt_dir: Path, job: Any, log: Callable[[str], None]) -> dict[str, Any] | None:
    """Load the checkpoint ``find_checkpoint`` picks into ``engine``; returns its step and data position. ``job``:
    the job's settings (``resume``, ``_MUST_MATCH``).

    Rank 0 picks and tells the others, so every rank loads the same tag even where a shared filesystem
    shows them the folder at different moments. None: ``--resume auto`` and no complete checkpoint.
    """
    ckpt_dir = Path(ckpt_dir)
    found = _from_rank0(find_checkpoint(ckpt_dir) if _rank_and_size()[0] == 0 else None)
    for note in found.notes:
        log(f"warning: {note}")
    if found.incomplete:
        log(f"ignoring {_describe_incomplete(found.incomplete)}")
    if found.tag is None:
        if job.resume == AUTO:
            log(f"--resume auto: no complete checkpoint in {ckpt_dir}, starting from step 0")
            return None
        raise TrainingSetupError(f"--resume: no complete checkpoint in {ckpt_dir}")
    tag = _first_undamaged(ckpt_dir, found, log)
    saved = found.markers[tag].get("world_size")
    how = ""
    if engine.load_universal_checkpoint():
        converted = _universal_checkpoint(ckpt_dir / tag)
        path, client_state = engine.load_checkpoint(str(ckpt_dir / tag), tag=universal.UNIVERSAL)
        how = (f", saved by {saved} ranks, on {_rank_and_size()[1]} through DeepSpeed's universal checkpoint "
               f"({converted} {ckpt_dir / tag / universal.UNIVERSAL})")  # fmt: skip
    else:
        _check_world_size(ckpt_dir / tag, found.markers[tag], _rank_and_size()[1])
        path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    state = (client_state or {}).get("lemo_ds_train")
    if path is None or state is None:
        raise TrainingSetupError(f"--resume: {ckpt_dir / tag} holds no checkpoint written by launch/train.py")
    changed = [
        f"{key} {state[key]!r} -> {getattr(job, key)!r}" for key in _MUST_MATCH if state.get(key) != getattr(job, key)
    ]
    if changed:
        log(f"warning: resuming with changed settings ({'; '.join(changed)}): the data order will not continue exactly")
    log(f"resumed from {ckpt_dir / tag} at step {state['step']} ({state['rows_consumed']} rows consumed){how}")
    restore_predictors(engine, ckpt_dir / tag, engine.device, log)
    return state


def restore_predictors(model: Any, tag_dir: Path, device: Any, log: Callable[[str], None]) -> bool:
    """Restore the predictor scorer of ``model`` (a converted model, or a DeepSpeed engine around one) from the
    checkpoint ``tag_dir`` onto ``device``, on every rank; returns whether it did. The files sit in the tag's folder
    whatever the number of ranks that saved it. A job with another scorer ignores them; a predictor job resuming a
    checkpoint without them (an oracle job's, or an older lemo_ds's) says what it loses."""
    scorer = bound_predictor_scorer(model)
    if scorer is None:
        return False
    if not checkpoint_saved(tag_dir):
        warning = _no_predictors_warning(scorer.config, tag_dir)
        if warning is not None:
            log(f"warning: {warning}")
        return False
    scorer.load_checkpoint(tag_dir, device)
    log(f"predictors restored from {tag_dir / CHECKPOINT_BANK} (layers {scorer.bank.layers}), not calibrated again")
    return True


def _no_predictors_warning(config: Any, tag_dir: Path) -> str | None:
    """What a predictor job (lemo ``config``) resuming ``tag_dir``, which holds no predictors, does differently from
    an uninterrupted run; None where nothing (a predictors file that no refresh changes)."""
    held = f"{tag_dir} holds no predictors (a checkpoint of a job with another scorer, or of an older lemo_ds)"
    if config.predictor_path is None:
        return (f"{held}: they are trained again from the start on the rows after the checkpoint, so the selections "
                "differ from an uninterrupted run's")  # fmt: skip
    if config.predictor.refresh_every > 0:
        return (f"{held}: they start again from {config.predictor_path}, without the online refreshes before the "
                "checkpoint, so the selections differ from an uninterrupted run's")  # fmt: skip
    return None


def _universal_checkpoint(tag_dir: Path) -> str:
    """Rank 0 converts ``tag_dir`` to a universal checkpoint unless it was; every rank raises the same
    TrainingSetupError if that fails. Returns how the folder came to be ("converted to" or "already in")."""
    outcome = None
    if _rank_and_size()[0] == 0:
        try:
            outcome = "already in" if universal.converted(tag_dir) is not None else "converted to"
            universal.convert(tag_dir)
        except (OSError, RuntimeError) as error:
            outcome = _Failure(0, str(error), disk_full=False)
    outcome = _from_rank0(outcome)
    if isinstance(outcome, _Failure):
        raise TrainingSetupError(
            f"--resume on another number of ranks: {outcome.cause}; resume on the number of ranks that saved it"
        )
    return outcome


def _first_undamaged(ckpt_dir: Path, found: Found, log: Callable[[str], None]) -> str:
    """The first candidate whose files match its marker (every rank checks a share; all agree on the verdict)."""
    rank, world_size = _rank_and_size()
    damaged = []
    for tag in found.candidates:
        manifest = found.markers[tag].get("files")
        if not isinstance(manifest, dict):  # a marker from before checksums: only a file count
            log(f"warning: {ckpt_dir / tag} has no checksums in its {COMPLETE} (an older lemo_ds); not verified")
            return tag
        share = checkpoint_files.damaged_files(ckpt_dir / tag, manifest, rank, world_size)
        problems = [line for part in _gather(share) for line in part]
        if not problems:
            if damaged:
                log(f"resuming from {tag}, the newest undamaged checkpoint")
            return tag
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        log(f"warning: checkpoint {ckpt_dir / tag} is damaged ({'; '.join(problems[:3])}{more}); skipping it")
        damaged.append(tag)
    raise TrainingSetupError(
        f"--resume: every complete checkpoint in {ckpt_dir} is damaged ({', '.join(damaged)}); restore one, or "
        "start over with --overwrite"
    )


# ---- helpers ---------------------------------------------------------------------------------------------


def _scan(ckpt_dir: Path) -> tuple[dict[str, dict], list[str]]:
    """The markers of the complete tags in ``ckpt_dir`` and the names of the incomplete ones."""
    markers, incomplete = {}, []
    for tag_dir in sorted(path for path in ckpt_dir.iterdir() if path.is_dir()):
        marker = _read_marker(tag_dir)
        if marker is None:
            incomplete.append(tag_dir.name)
        else:
            markers[tag_dir.name] = marker
    return markers, incomplete


def _read_marker(tag_dir: Path) -> dict | None:
    """A tag's completion marker, None without a (readable) one."""
    try:
        marker = json.loads((tag_dir / COMPLETE).read_text(encoding="utf-8"))
        int(marker["step"])
        return marker
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _read_latest(ckpt_dir: Path) -> str | None:
    try:
        return (ckpt_dir / LATEST).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def _describe_incomplete(tags: tuple[str, ...]) -> str:
    return f"incomplete checkpoint{'s' if len(tags) > 1 else ''} without {COMPLETE}: {', '.join(tags)}"


def _rank_and_size() -> tuple[int, int]:
    return distributed.rank(), distributed.world_size()


def _gather(share: Any) -> list:
    """Every rank's ``share``, in rank order (a collective)."""
    if _rank_and_size()[1] == 1:
        return [share]
    gathered = [None] * _rank_and_size()[1]
    torch.distributed.all_gather_object(gathered, share)
    return gathered


def _from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a collective; the other ranks pass anything, e.g. None)."""
    if _rank_and_size()[1] == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]

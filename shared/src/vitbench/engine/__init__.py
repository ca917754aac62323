"""The training loop every package shares: DeiT recipe on HuggingFace Accelerate.

Accelerate provides devices, DDP (``accelerate launch``; ``torchrun --nproc_per_node N ... --cpu`` on CPU boxes),
mixed precision, gradient accumulation and ``save_state``/``load_state``. timm provides the transforms, Mixup/CutMix,
losses, optimiser and scheduler. What this package adds:

* exact resume: the sample order of an epoch comes from a seeded sampler, the augmentation of sample ``i`` in
  epoch ``e`` is a pure function of ``(seed, e, i)``, and RNG states are restored, so a run killed after any
  checkpoint and resumed ends with the same weights as an uninterrupted one (:mod:`.loop`);
* atomic checkpoints: ``save_state`` writes into a temporary directory that is renamed into place, with a
  ``progress.json`` listing every file's size (a truncated checkpoint is recognised and skipped on resume) and the
  run's configuration (a resume with other settings is refused unless ``--resume-override`` names them)
  (:mod:`.runs`);
* one run, one output folder (``--overwrite`` to start over, once every input of the new run loaded), checked
  writable before any work and locked for the run's lifetime (:mod:`.runs`, :mod:`.lock`);
* divergence: a non-finite loss, weights or outputs stop the run in one line naming the update and the newest intact
  checkpoint; non-finite weights are never saved (:mod:`.health`);
* a failed write (disk full, I/O error) names the path and the free space, earlier checkpoints intact (:mod:`.runs`);
* preemption: SIGTERM / SIGUSR1 finish the current update, write a checkpoint and exit with
  :data:`EXIT_PREEMPTED`; Ctrl-C the same with :data:`EXIT_INTERRUPTED` (:mod:`.signals`);
* ``--num-classes`` (a new head) and ``--report-to`` (Accelerate's trackers, :mod:`.tracking`);
* the repeated-augmentation sampler is applied per rank by hand, never sharded a second time by ``prepare``.

The configuration and its flags are in :mod:`.config`; image and video data come through
:mod:`vitbench.sources`.
"""

from ..sources import resolve_input
from .config import TrainConfig, add_train_args
from .health import Diverged
from .lock import RunLock, RunLocked
from .loop import LossFn, Recipe, new_head, train
from .metrics import evaluate_classifier, ranks_in_sync
from .runs import (
    RUN_FILES,
    RUN_ONLY_FIELDS,
    RunFolder,
    TrainProgress,
    accept_changes,
    check_override_names,
    checkpoint_problem,
    claim_output_dir,
    config_changes,
    held_run_files,
    lock_run,
    remove_run_files,
    resume_candidates,
)
from .signals import EXIT_INTERRUPTED, EXIT_PREEMPTED, Preempted, stop_signals

__all__ = [
    "EXIT_INTERRUPTED", "EXIT_PREEMPTED", "RUN_FILES", "RUN_ONLY_FIELDS", "Diverged", "LossFn", "Preempted",
    "Recipe", "RunFolder", "RunLock", "RunLocked", "TrainConfig", "TrainProgress", "accept_changes",
    "add_train_args", "check_override_names", "checkpoint_problem", "claim_output_dir", "config_changes",
    "evaluate_classifier", "held_run_files", "lock_run", "new_head", "ranks_in_sync", "remove_run_files",
    "resolve_input", "resume_candidates", "stop_signals", "train",
]

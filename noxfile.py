"""Sessions: ``nox`` runs the tests of every package and the linter.

* ``nox -s tests``                 -- all packages; ``nox -s "tests(package='ats')"`` for one
* ``nox -s lint``                  -- ruff
* ``nox -s bench``                 -- every package's CPU speed benchmark (``packages/*/benchmarks/*.py``), one table
* ``nox -s gpu``                   -- ``tools/gpu_check.py``'s CPU tests, then the check itself when CUDA is present
* ``nox -s reproduce``             -- the three methods side by side on the embedded default: writes
                                      ``docs/RESULTS.md``'s generated section and ``docs/figures/``

Each session gets its own virtualenv (uv when available, which hard-links torch from its cache; plain virtualenv
otherwise). Tests run offline: no Hub, no pretrained downloads.
"""

from pathlib import Path

import nox

ROOT = Path(__file__).parent
PACKAGES = sorted(p.name for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").is_file())
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

nox.needs_version = ">=2024.3.2"
nox.options.default_venv_backend = "uv|virtualenv"
nox.options.sessions = ["tests", "lint"]


def _install(session: nox.Session, package: str) -> None:
    if package == "vitbench":
        session.install("-e", "shared[test]")  # the test extra: pytest, and tensorboard for --report-to's test
    elif package == "tools":  # tools/ drives every package
        session.install(*(a for p in PACKAGES for a in ("-e", f"packages/{p}")), "pytest")
        session.install("--no-deps", "-e", "shared")
    else:
        extra = ["transformers"] if package == "ats" else []  # HF's CvT: the reference of ats.backbones.cvt's tests
        session.install("-e", f"packages/{package}", "pytest", *extra)
        session.install("--no-deps", "-e", "shared")  # editable too, so edits to vitbench are seen


@nox.session
@nox.parametrize("package", ["vitbench", *PACKAGES, "tools"])
def tests(session: nox.Session, package: str) -> None:
    """Unit and integration tests of one package, or of ``tools/`` (CPU, offline)."""
    _install(session, package)
    where = {"vitbench": "shared/tests", "tools": "tools/tests"}.get(package, f"packages/{package}/tests")
    session.run("pytest", "-q", "-p", "no:cacheprovider", where, *session.posargs, env=OFFLINE)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the whole tree."""
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session
def bench(session: nox.Session) -> None:
    """CPU speed of every method against eager and compiled dense DeiT-S at batch 1 and 32 (side by side in one
    process per script; JSON under runs/bench/: ``<package>.json``, or ``<package>_<name>.json`` for
    ``bench_<name>.py`` in a package with several), then one table of all of them. Arguments go to every script,
    e.g. ``nox -s bench -- --compile all``. About 14 minutes on two shared cores."""
    for package in PACKAGES:
        session.install("-e", f"packages/{package}")
    session.install("--no-deps", "-e", "shared")
    scripts = sorted(ROOT.glob("packages/*/benchmarks/*.py"))
    if not scripts:
        session.skip("no benchmarks")
    results = []
    for script in scripts:
        package = script.parent.parent.name
        several = sum(s.parent == script.parent for s in scripts) > 1  # then each script writes its own file
        results.append(f"runs/bench/{package}{'_' + script.stem.removeprefix('bench_') if several else ''}.json")
        session.run("python", str(script.relative_to(ROOT)), "--json", results[-1], *session.posargs, env=OFFLINE)
    session.run("python", "-m", "vitbench.bench", *results)


@nox.session
def gpu(session: nox.Session) -> None:
    """The three methods on CUDA vs CPU and the CUDA throughput sweep (``tools/gpu_check.py``); its CPU tests first."""
    for package in PACKAGES:
        session.install("-e", f"packages/{package}")
    session.install("--no-deps", "-e", "shared")
    session.install("pytest")
    session.run("pytest", "-q", "-p", "no:cacheprovider", "tools/tests", env=OFFLINE)
    if session.run("python", "-c", "import torch; print(int(torch.cuda.is_available()))", silent=True).strip() != "1":
        session.skip("no CUDA device: ran the CPU tests only")
    session.run("python", "tools/gpu_check.py", *session.posargs, env=OFFLINE)


@nox.session
def reproduce(session: nox.Session) -> None:
    """ATS, LF-ViT and Life-Regression on the embedded default, side by side (``tools/reproduce.py``, one thread)."""
    for package in PACKAGES:
        session.install("-e", f"packages/{package}")
    session.install("--no-deps", "-e", "shared")
    session.run("python", "tools/reproduce.py", *session.posargs,
                env={**OFFLINE, "OMP_NUM_THREADS": "1"})  # one thread: timings that other processes scatter least

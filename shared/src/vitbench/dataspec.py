"""The ``--data`` values: :class:`DataSpec`, its parser and :class:`DataError`.

* ``digits[:KEY=INT,...]`` -- the embedded cluttered digits (:mod:`vitbench.digits`);
* ``imagefolder:PATH``, ``hf:NAME[:CONFIG]``, ``arrow:PATH`` -- images (:mod:`vitbench.data`);
* ``moving-digits[:KEY=INT,...]`` -- the embedded clips (:mod:`vitbench.moving_digits`);
* ``videofolder:PATH`` -- video files (:mod:`vitbench.video`).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import digits as digits_lib
from .moving_digits import MovingDigitsConfig

VIDEO_KINDS = ("moving-digits", "videofolder")
DIGITS_OPTIONS = ("train_size", "val_size", "canvas", "seed")
MOVING_DIGITS_OPTIONS = ("train_size", "val_size", "frames", "canvas", "seed")


class DataError(ValueError):
    """A dataset that cannot be found, read or decoded."""


@dataclass(frozen=True)
class DataSpec:
    kind: str  # digits | imagefolder | hf | arrow | moving-digits | videofolder
    path: str | None = None
    name: str | None = None
    config: str | None = None
    options: tuple[tuple[str, int], ...] = ()

    def __str__(self) -> str:
        if self.kind in ("digits", "moving-digits"):
            return self.kind + (":" + ",".join(f"{k}={v}" for k, v in self.options) if self.options else "")
        if self.kind == "hf":
            return f"hf:{self.name}" + (f":{self.config}" if self.config else "")
        return f"{self.kind}:{self.path}"


def parse_data_spec(text: str | DataSpec) -> DataSpec:
    """Parse ``digits``, ``imagefolder:PATH``, ``hf:NAME[:CONFIG]`` or ``arrow:PATH``."""
    if isinstance(text, DataSpec):
        return text
    kind, _, rest = text.partition(":")
    if kind == "digits":
        return DataSpec("digits", options=_digits_options(rest)) if rest else DataSpec("digits")
    if kind in ("imagefolder", "arrow") and rest:
        return DataSpec(kind, path=rest)
    if kind == "hf" and rest:
        name, _, config = rest.partition(":")
        return DataSpec("hf", name=name, config=config or None)
    if kind in VIDEO_KINDS:
        return parse_video_spec(text)
    raise DataError(f"cannot parse data spec {text!r}; use digits, imagefolder:PATH, hf:NAME[:CONFIG], arrow:PATH, "
                    "moving-digits or videofolder:PATH")


def _digits_options(text: str) -> tuple[tuple[str, int], ...]:
    allowed = DIGITS_OPTIONS
    options = []
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in allowed or not value.lstrip("-").isdigit():
            raise DataError(f"bad digits option {item!r}; use digits:KEY=INT,... with KEY in {allowed}")
        options.append((key, int(value)))
    try:
        digits_lib.DigitsConfig(**dict(options))
    except ValueError as e:
        raise DataError(f"digits: {e}") from e
    return tuple(options)


def parse_video_spec(text: str) -> DataSpec:
    """``moving-digits[:KEY=INT,...]`` or ``videofolder:PATH``."""
    kind, _, rest = text.partition(":")
    if kind == "videofolder" and rest:
        return DataSpec("videofolder", path=rest)
    if kind != "moving-digits":
        raise DataError(f"cannot parse video data spec {text!r}; use moving-digits[:KEY=INT,...] or videofolder:PATH")
    options = []
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in MOVING_DIGITS_OPTIONS or not value.isdigit():
            raise DataError(f"bad moving-digits option {item!r}; use moving-digits:KEY=INT,... with KEY in "
                            f"{MOVING_DIGITS_OPTIONS}")
        options.append((key, int(value)))
    try:
        MovingDigitsConfig(**dict(options))
    except ValueError as e:
        raise DataError(f"moving-digits: {e}") from e
    return DataSpec("moving-digits", options=tuple(options))


def is_video(spec: str | DataSpec) -> bool:
    """Whether a spec names clips (:mod:`vitbench.video`) rather than images."""
    return (spec.kind if isinstance(spec, DataSpec) else spec.partition(":")[0]) in VIDEO_KINDS

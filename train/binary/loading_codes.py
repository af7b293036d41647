"""Loading codes: how the channels of a source image become the network's input channels, per sample.

A loading code is a comma-separated list (brackets optional) with one entry per network input channel:

    entry      meaning (training draw)                                          at inference / validation
    ---------  ---------------------------------------------------------------  --------------------------
    k          source channel k (0-50)                                          the same
    x          a blank channel (zeros)                                          the same
    a|b|c      randomization: one of the channels a, b, c, uniformly            the first, a
    k?p        channel dropout: channel k, blank with probability p             channel k
    a+b+c      merge: the mean of channels a, b, c                              the same
    a+b?p+c    merge dropout: b joins the merge with probability p (a, c        every channel joins
               always); a merge that no channel joined is blank
    51-199     a user-defined code (`register_loading_code`)                    the code's own rule

So "0,1,2" loads three channels as they are, "0|1|2" feeds one random channel of three to a one-channel
net, "0,1?0.5" blanks the second channel of half the samples, and "0+1?0.3+2" merges three channels where
channel 1 joins 30 % of the time. Channels a source image does not have read as blank. The empty code
loads the first C channels (zero-padded), as the rest of the project does (`to_model_channels`).

Codes are applied to the normalized, augmented crop (C_src, T, T) after the geometry, with draws from the
sample's own generator (`loading_generator`: a pure function of (seed, epoch, position), independent of the
augmentation's streams), so one sample key replays the same code outcome in any worker or process.
User codes 51-199 live in one place, `USER_CODES`, filled by `register_loading_code` calls in this module.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

MAX_CHANNEL = 50
USER_CODE_RANGE = (51, 199)
# the 4th child stream of a sample's SeedSequence (train.data uses children 0-2 for geometry, degradation,
# intensity): spawn_key (3,) is the stream SeedSequence([seed, epoch, position]).spawn(4)[3] would give
LOADING_STREAM = 3

# fn(image (C_src, H, W) float32, rng or None at inference) -> (H, W) float32 plane
UserCodeFn = Callable[[np.ndarray, np.random.Generator | None], np.ndarray]


@dataclass(frozen=True)
class UserCode:
    """A registered code 51-199: its number, a one-line description (README table) and its function."""

    code: int
    description: str
    fn: UserCodeFn


USER_CODES: dict[int, UserCode] = {}


def register_loading_code(code: int, description: str) -> Callable[[UserCodeFn], UserCodeFn]:
    """Decorator registering `fn(image (C, H, W) float32, rng | None) -> (H, W) float32` as user code `code`.

    `rng` is the sample's generator while training and None at inference (the code must then be deterministic).
    Raises ValueError for a code outside 51-199 or registered twice.
    """

    def decorator(fn: UserCodeFn) -> UserCodeFn:
        lo, hi = USER_CODE_RANGE
        if not lo <= int(code) <= hi:
            raise ValueError(f"user loading codes are {lo}-{hi}, got {code}")
        if int(code) in USER_CODES:
            raise ValueError(f"loading code {code} is registered twice")
        USER_CODES[int(code)] = UserCode(int(code), description, fn)
        return fn

    return decorator


@register_loading_code(51, "grey: the mean of all source channels that are not blank")
def _grey(image: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    nonempty = [ch for ch in image if ch.any()]
    return np.mean(nonempty, axis=0).astype(np.float32) if nonempty else np.zeros(image.shape[1:], np.float32)


@register_loading_code(52, "one random source channel among those that are not blank (inference: the first)")
def _any_channel(image: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    nonempty = [c for c in range(image.shape[0]) if image[c].any()]
    if not nonempty:
        return np.zeros(image.shape[1:], np.float32)
    pick = nonempty[0] if rng is None else nonempty[int(rng.integers(len(nonempty)))]
    return image[pick].astype(np.float32, copy=False)


@dataclass(frozen=True)
class Term:
    """One merge member: source channel `channel`, joining with probability `p` (1 = always)."""

    channel: int
    p: float = 1.0


@dataclass(frozen=True)
class Entry:
    """One network input channel. kind: "channel" (choices has one channel; p = keep probability), "blank",
    "choice" (one of `choices` at random), "merge" (mean of `terms`), or "user" (`user` code)."""

    kind: str
    text: str
    choices: tuple[int, ...] = ()
    p: float = 1.0
    terms: tuple[Term, ...] = ()
    user: int = 0


_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:e-?\d+)?"
_CHANNEL = re.compile(r"^(\d+)(?:\?(" + _NUMBER + r"))?$")


def _channel(text: str, where: str) -> tuple[int, float]:
    m = _CHANNEL.match(text)
    if not m:
        raise ValueError(f"loading code {where}: {text!r} is not a channel (k) or a channel dropout (k?p)")
    channel = int(m.group(1))
    p_blank = float(m.group(2)) if m.group(2) is not None else 0.0
    if not 0.0 <= p_blank <= 1.0:
        raise ValueError(f"loading code {where}: probability {p_blank} in {text!r} is outside [0, 1]")
    return channel, p_blank


def _parse_entry(text: str, where: str) -> Entry:
    if text == "x":
        return Entry("blank", text)
    if "+" in text:
        terms = []
        for part in text.split("+"):
            channel, p = _channel(part, where)
            if channel > MAX_CHANNEL:
                raise ValueError(f"loading code {where}: merged channels are 0-{MAX_CHANNEL}, got {channel}")
            # in a merge, '?p' is the probability of JOINING (merge dropout), not of being blanked
            terms.append(Term(channel, p if "?" in part else 1.0))
        return Entry("merge", text, terms=tuple(terms))
    if "|" in text:
        choices = []
        for part in text.split("|"):
            if not part.isdigit() or int(part) > MAX_CHANNEL:
                raise ValueError(f"loading code {where}: randomization takes channels 0-{MAX_CHANNEL}, got {part!r}")
            choices.append(int(part))
        return Entry("choice", text, choices=tuple(choices))
    channel, p_blank = _channel(text, where)
    if channel > MAX_CHANNEL:
        if not USER_CODE_RANGE[0] <= channel <= USER_CODE_RANGE[1]:
            raise ValueError(f"loading code {where}: {channel} is neither a channel (0-{MAX_CHANNEL}) nor a user "
                             f"code ({USER_CODE_RANGE[0]}-{USER_CODE_RANGE[1]})")
        if channel not in USER_CODES:
            known = ", ".join(str(c) for c in sorted(USER_CODES)) or "none"
            raise ValueError(f"loading code {where}: user code {channel} is not registered (registered: {known})")
        if "?" in text:
            raise ValueError(f"loading code {where}: a user code takes no dropout ({text!r})")
        return Entry("user", text, user=channel)
    return Entry("channel", text, choices=(channel,), p=1.0 - p_blank)


@dataclass(frozen=True)
class LoadingCode:
    """A parsed loading code (see the module docstring); `entries` has one Entry per network input channel."""

    text: str
    entries: tuple[Entry, ...]

    @property
    def n_outputs(self) -> int:
        """Network input channels this code produces."""
        return len(self.entries)

    @property
    def n_sources(self) -> int:
        """Source channels the code reads (1 + the largest channel index; 0 when it reads none by index)."""
        used = [c for e in self.entries for c in (*e.choices, *(t.channel for t in e.terms))]
        return max(used) + 1 if used else 0

    @property
    def uses_all_channels(self) -> bool:
        """True when a user code reads every source channel (the crop must keep them all)."""
        return any(e.kind == "user" for e in self.entries)

    def apply(self, image: np.ndarray, rng: np.random.Generator | None = None) -> tuple[np.ndarray, list[str]]:
        """Load the network input from a normalized crop or image.

        image: (C_src, H, W) float32 (missing channels read as blank). rng: the sample's generator
        (`loading_generator`), or None for the deterministic inference rule.
        Returns ((n_outputs, H, W) float32, one short description per channel of what it received,
        e.g. ["2", "x", "0+1"]). Every entry draws a fixed number of values, whatever its outcome.
        """
        image = np.asarray(image, np.float32)
        if image.ndim != 3:
            raise ValueError(f"loading codes take a (C, H, W) image, got shape {image.shape}")
        out = np.zeros((self.n_outputs, *image.shape[1:]), np.float32)
        told: list[str] = []

        def plane(c: int) -> np.ndarray | None:
            return image[c] if c < image.shape[0] else None

        for k, e in enumerate(self.entries):
            if e.kind == "blank":
                told.append("x")
                continue
            if e.kind == "user":
                out[k] = USER_CODES[e.user].fn(image, rng)
                told.append(str(e.user))
                continue
            if e.kind == "choice":
                c = e.choices[0] if rng is None else e.choices[int(rng.integers(len(e.choices)))]
                src = plane(c)
                if src is not None:
                    out[k] = src
                told.append(str(c))
                continue
            if e.kind == "channel":
                keep = True if rng is None else bool(rng.random() < e.p)
                src = plane(e.choices[0])
                if keep and src is not None:
                    out[k] = src
                told.append(str(e.choices[0]) if keep else "x")
                continue
            draws = rng.random(len(e.terms)) if rng is not None else np.zeros(len(e.terms))
            joined = [t.channel for t, u in zip(e.terms, draws, strict=True) if u < t.p]
            planes = [p for p in (plane(c) for c in joined) if p is not None]
            if planes:
                out[k] = np.mean(planes, axis=0)
            told.append("+".join(str(c) for c in joined) if joined else "x")
        return out, told


def identity_code(n_channels: int) -> LoadingCode:
    """The code of the empty string: the first `n_channels` source channels ("0,1,...,C-1")."""
    return parse_loading_code(",".join(str(c) for c in range(n_channels)))


def parse_loading_code(text: str, n_channels: int | None = None) -> LoadingCode:
    """Parse a loading code (module docstring); "" with `n_channels` = the identity on the first n_channels.

    Raises ValueError naming the bad entry, or when `n_channels` is given and the code makes another number
    of channels.
    """
    body = text.strip().removeprefix("[").removesuffix("]").replace(" ", "")
    if not body:
        if n_channels is None:
            raise ValueError("the empty loading code needs the number of network input channels")
        return identity_code(n_channels)
    parts = body.split(",")
    entries = tuple(_parse_entry(part, f"{text!r} entry {i}") for i, part in enumerate(parts))
    code = LoadingCode(text.strip(), entries)
    if n_channels is not None and code.n_outputs != n_channels:
        raise ValueError(f"loading code {text!r} makes {code.n_outputs} channels but the network takes {n_channels}")
    return code


def loading_generator(seed: int, epoch: int, position: int) -> np.random.Generator:
    """The sample's loading-code generator: a pure function of (seed, epoch, position), independent of the
    geometry / degradation / intensity streams of `train.data.sample_generators`."""
    stream = np.random.SeedSequence([int(seed), int(epoch), int(position)], spawn_key=(LOADING_STREAM,))
    return np.random.Generator(np.random.PCG64(stream))


def code_table() -> list[tuple[str, str]]:
    """(entry, meaning) rows of every built-in form and registered user code, for the README and `--help`."""
    rows = [("k", f"source channel k (0-{MAX_CHANNEL})"), ("x", "a blank channel"),
            ("a|b|c", "one of the channels at random (inference: the first)"),
            ("k?p", "channel k, blank with probability p (inference: kept)"),
            ("a+b+c", "the mean of the channels"),
            ("a+b?p+c", "merge where b joins with probability p (inference: all join; none joined: blank)")]
    rows += [(str(c), USER_CODES[c].description) for c in sorted(USER_CODES)]
    return rows

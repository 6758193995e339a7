"""Weight formats: one validated, serialisable config per format, found through a registry.

A format spec is the single name a plan, a report, a fingerprint and a kernel all agree on:
``dense``, ``2:4``, ``block:B:D`` (BxB blocks, fraction D of blocks kept), ``lowrank:R``,
``monarch:NB`` (NB blocks per factor), ``act:S`` (the weight dense, a token's inputs under a
calibrated magnitude skipped, a fraction S of them on calibration data), ``actrot:S`` (the same on
the inputs turned into the layer's principal axes first) and the composites
``2:4+lowrank:R`` and ``block:B:D+lowrank:R`` (a sparse weight plus a rank-R term fitted to what
it leaves out). ``parse_spec`` turns the text into a frozen dataclass and
``str(spec)`` turns it back, so plans and reports round-trip exactly.

Each spec also answers the two questions the planner asks before any arithmetic: can a weight of
shape N x K take this format at all (``check``, which returns the reason it cannot), and how much
of the weight does it declare away (``declared_sparsity``). And it is where everything else that
differs between families is found, so that no other module switches on a family's name: the
parameters a fingerprint entry records (``record`` / ``from_record``), the settings a fingerprint
times from a parameter grid (``settings``), which settings share one curve of the cost model
(``curve_key``), the name of a setting across shapes (``label`` / ``from_label``), the random
factors a timing builds (``factors``), and whether the format keeps values of the dense weight in
place (``prunes``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

__all__ = [
    "FormatSpec",
    "Dense",
    "TwoFour",
    "Block",
    "LowRank",
    "Monarch",
    "Act",
    "ActRot",
    "TwoFourPlusLowRank",
    "BlockPlusLowRank",
    "FAMILIES",
    "STRUCTURED_FAMILIES",
    "parse_spec",
    "FormatError",
]

BLOCK_SIZES = (16, 32, 64, 128)


class FormatError(ValueError):
    """A format name that does not parse or names impossible parameters."""


@dataclass(frozen=True)
class FormatSpec:
    family: ClassVar[str] = ""
    syntax: ClassVar[str] = ""  # how its name is written, parameters as letters
    # keeps a subset of the dense weight's values where they were (zeros elsewhere): a runtime
    # without a sparse kernel for it stores and multiplies the whole dense shape
    prunes: ClassVar[bool] = False
    # holds such a pruned weight, whole or as one of its parts (a composite's sparse part): on the
    # ONNX path that part is written, and runs, as a dense weight with zeros
    pruned_part: ClassVar[bool] = False
    # the cost model interpolates along the last entry of ``curve_key`` (named so in its notes),
    # with log-log slopes bounded so outside the measured range (time against the parameter)
    param_label: ClassVar[str] = ""
    param_slopes: ClassVar[tuple[float, float]] = (0.0, 1.0)
    group_label: ClassVar[str] = ""  # what the key's other entries are, where it has any
    # its candidate is fitted by least squares weighted with the calibration Gram (too few rows
    # make that fit fall back to a diagonal Gram, which the report then says)
    fits_to_gram: ClassVar[bool] = True
    # part of its time is work on the input alone (actrot's product with the rotation), which layers
    # reading one input do once in their stacked launch: the planner prices each such layer as its
    # share of that launch (``sparsec.launches.price_shared``)
    shares_input_work: ClassVar[bool] = False

    def __str__(self) -> str:  # pragma: no cover - every subclass overrides
        return self.family

    def check(self, N: int, K: int) -> str | None:
        """Why a weight of N outputs by K inputs cannot take this format, or None if it can."""
        return None

    def stored_params(self, N: int, K: int) -> int:
        """Number of weight values the format keeps (metadata excluded)."""
        return N * K

    def declared_sparsity(self, N: int, K: int) -> float:
        """Fraction of the dense weight's values the format does not store."""
        return max(0.0, 1.0 - self.stored_params(N, K) / float(N * K))

    @classmethod
    def parse_args(cls, args: list[str]) -> "FormatSpec":
        raise NotImplementedError

    @classmethod
    def example(cls) -> "FormatSpec":
        """A valid setting of the family (to look its handlers up)."""
        return cls()

    def record(self) -> dict:
        """The parameters a fingerprint entry stores beside M, N, K (``from_record`` reads them back)."""
        return {}

    @classmethod
    def from_record(cls, entry: Mapping) -> "FormatSpec":
        return cls()

    @classmethod
    def settings(cls, N: int, K: int, grid: Sequence = ()) -> "list[FormatSpec]":
        """The settings a fingerprint times at N x K, from the family's parameter grid, in its order
        (the grid's first entry is measured first); shape checks are left to the caller."""
        return [cls()]

    def curve_key(self, N: int, K: int) -> tuple:
        """Settings with equal keys lie on one curve of the cost model, across shapes."""
        return ()

    def label(self, N: int, K: int) -> str:
        """The name of this setting across shapes (``from_label`` gives the spec at another shape)."""
        return str(self)

    @classmethod
    def from_label(cls, label: str, N: int, K: int) -> "FormatSpec":
        return parse_spec(label)

    def factors(self, N: int, K: int) -> "dict[str, tuple[int, ...]] | None":
        """The shapes of the factors a factored format stores (None: packed from a dense weight)."""
        return None

    def cost_note(self, M: int) -> str:
        """What a reason for the format's time at M tokens adds (e.g. "; at 8 tokens ...")."""
        return ""

    def dense_parts(self, N: int, K: int) -> "list[tuple[int, int]] | None":
        """The (N, K) of the dense GEMMs the format amounts to, applied in turn, where it is one
        (a fingerprint without its measurements prices it from dense); None where it is not."""
        return None


@dataclass(frozen=True)
class Dense(FormatSpec):
    family: ClassVar[str] = "dense"
    syntax: ClassVar[str] = "dense"

    def __str__(self) -> str:
        return "dense"

    @classmethod
    def parse_args(cls, args):
        if args:
            raise FormatError("'dense' takes no parameters")
        return cls()


@dataclass(frozen=True)
class TwoFour(FormatSpec):
    """Two of every four consecutive input weights kept (NVIDIA's semi-structured sparsity)."""

    family: ClassVar[str] = "2:4"
    syntax: ClassVar[str] = "2:4"
    prunes: ClassVar[bool] = True
    pruned_part: ClassVar[bool] = True

    def __str__(self) -> str:
        return "2:4"

    def check(self, N, K):
        if K % 4:
            return f"K={K} is not divisible by 4, which 2:4 needs"
        return None

    def stored_params(self, N, K):
        return N * K // 2

    @classmethod
    def parse_args(cls, args):
        if args:
            raise FormatError("'2:4' takes no parameters")
        return cls()


@dataclass(frozen=True)
class Block(FormatSpec):
    """Block-sparse: the weight tiled in B x B blocks, a fraction ``density`` of them kept."""

    family: ClassVar[str] = "block"
    syntax: ClassVar[str] = "block:B:D"
    prunes: ClassVar[bool] = True
    pruned_part: ClassVar[bool] = True
    # more kept blocks never make a layer faster, nor more than proportionally slower
    param_label: ClassVar[str] = "kept fraction"
    group_label: ClassVar[str] = "block"
    block: int
    density: float

    def __post_init__(self):
        if self.block not in BLOCK_SIZES:
            raise FormatError(f"block size {self.block} not supported; use one of {BLOCK_SIZES}")
        if not (0.0 < self.density <= 1.0):
            raise FormatError(f"block kept fraction {self.density} must be in (0, 1]")

    def __str__(self) -> str:
        return f"block:{self.block}:{_fmt_float(self.density)}"

    def check(self, N, K):
        bad = [f"{name}={v}" for name, v in (("N", N), ("K", K)) if v % self.block]
        if bad:
            return f"{' and '.join(bad)} not divisible by block {self.block}"
        return None

    def kept_blocks(self, N: int, K: int) -> int:
        total = (N // self.block) * (K // self.block)
        return max(1, int(round(self.density * total)))

    def stored_params(self, N, K):
        return self.kept_blocks(N, K) * self.block * self.block

    @classmethod
    def parse_args(cls, args):
        if len(args) != 2:
            raise FormatError("block format is 'block:B:D', e.g. 'block:64:0.25'")
        return cls(block=_parse_int(args[0], "block size"), density=_parse_float(args[1], "kept fraction"))

    @classmethod
    def example(cls):
        return cls(64, 0.25)

    def record(self):
        return {"block": self.block, "density": self.density}

    @classmethod
    def from_record(cls, entry):
        return cls(int(entry["block"]), float(entry["density"]))

    @classmethod
    def settings(cls, N, K, grid=()):
        return [cls(int(b), float(d)) for b, d in grid]

    def curve_key(self, N, K):
        return (self.block, float(self.density))


@dataclass(frozen=True)
class LowRank(FormatSpec):
    """W ~= U @ V with U: N x R and V: R x K."""

    family: ClassVar[str] = "lowrank"
    syntax: ClassVar[str] = "lowrank:R"
    param_label: ClassVar[str] = "rank fraction"  # a larger rank: never faster, at most proportionally slower
    rank: int

    def __post_init__(self):
        if self.rank < 1:
            raise FormatError(f"rank {self.rank} must be at least 1")

    def __str__(self) -> str:
        return f"lowrank:{self.rank}"

    def check(self, N, K):
        if self.rank >= min(N, K):
            return f"rank {self.rank} is not below min(N, K)={min(N, K)}"
        return None

    def stored_params(self, N, K):
        return self.rank * (N + K)

    @classmethod
    def parse_args(cls, args):
        if len(args) != 1:
            raise FormatError("low-rank format is 'lowrank:R', e.g. 'lowrank:256'")
        return cls(rank=_parse_int(args[0], "rank"))

    @classmethod
    def example(cls):
        return cls(8)

    def record(self):
        return {"rank": self.rank}

    @classmethod
    def from_record(cls, entry):
        return cls(int(entry["rank"]))

    @classmethod
    def settings(cls, N, K, grid=()):
        """``grid`` holds ranks as fractions of min(N, K); equal ranks are timed once."""
        return [cls(r) for r in dict.fromkeys(max(1, round(f * min(N, K))) for f in grid)]

    def curve_key(self, N, K):
        return (self.rank / min(N, K),)

    def label(self, N, K):
        return f"lowrank@{self.rank / min(N, K):g}"

    @classmethod
    def from_label(cls, label, N, K):
        if label.startswith("lowrank@"):
            return cls(max(1, round(float(label.split("@")[1]) * min(N, K))))
        return parse_spec(label)

    def factors(self, N, K):
        return {"u": (N, self.rank), "v": (self.rank, K)}

    def dense_parts(self, N, K):
        return [(self.rank, K), (N, self.rank)]


@dataclass(frozen=True)
class Monarch(FormatSpec):
    """W = blockdiag(R) @ P @ blockdiag(L): two block-diagonal factors of NB blocks each.

    The layout every part of sparsec shares, for W of N outputs by K inputs, p = K/NB, n = N/NB:
    ``L`` is (NB, p, p) and maps input block b (x[b*p:(b+1)*p]) to z[b] = L[b] @ x_b;
    ``P`` reads the (NB, p) intermediate as (p, NB) transposed and regroups it into NB
    contiguous chunks of p (so chunk c sees every first-stage block when NB divides p);
    ``R`` is (NB, n, p) and maps chunk c to outputs y[c*n:(c+1)*n]. Stores (K + N) K / NB values.
    """

    family: ClassVar[str] = "monarch"
    syntax: ClassVar[str] = "monarch:NB"
    # more blocks never make it slower, nor more than proportionally faster
    param_label: ClassVar[str] = "monarch blocks"
    param_slopes: ClassVar[tuple[float, float]] = (-1.0, 0.0)
    nblocks: int

    def __post_init__(self):
        if self.nblocks < 2:
            raise FormatError(f"monarch needs at least 2 blocks, got {self.nblocks}")

    def __str__(self) -> str:
        return f"monarch:{self.nblocks}"

    def check(self, N, K):
        nb = self.nblocks
        if N % nb:
            return f"N={N} not divisible by {nb} monarch blocks"
        if K % (nb * nb):
            return f"K={K} not divisible by {nb}x{nb}={nb * nb}, which monarch:{nb} needs to mix every input"
        return None

    def stored_params(self, N, K):
        nb = self.nblocks
        return nb * (K // nb) * (K // nb) + nb * (N // nb) * (K // nb)

    @classmethod
    def parse_args(cls, args):
        if len(args) != 1:
            raise FormatError("monarch format is 'monarch:NB', e.g. 'monarch:64'")
        return cls(nblocks=_parse_int(args[0], "block count"))

    @classmethod
    def example(cls):
        return cls(4)

    def record(self):
        return {"nblocks": self.nblocks}

    @classmethod
    def from_record(cls, entry):
        return cls(int(entry["nblocks"]))

    @classmethod
    def settings(cls, N, K, grid=()):
        return [cls(int(nb)) for nb in grid]

    def curve_key(self, N, K):
        return (self.nblocks,)

    def factors(self, N, K):
        nb = self.nblocks
        return {"L": (nb, K // nb, K // nb), "R": (nb, N // nb, K // nb)}


@dataclass(frozen=True)
class Act(FormatSpec):
    """Activation sparsity: the weight kept dense, and for each token the inputs whose magnitude is
    under a per-layer threshold treated as zero, so the weight columns they would multiply are not
    read. The threshold is calibrated so that a fraction ``skip`` of calibration inputs fall under
    it; how much a launch of several tokens saves depends on the union of their kept inputs."""

    family: ClassVar[str] = "act"
    syntax: ClassVar[str] = "act:S"
    fits_to_gram: ClassVar[bool] = False  # a threshold on input magnitudes, from their histogram
    # skipping more never makes a layer slower, nor more than proportionally faster than the
    # bytes it leaves unread
    param_label: ClassVar[str] = "skip fraction"
    param_slopes: ClassVar[tuple[float, float]] = (-3.0, 0.0)
    skip: float

    def __post_init__(self):
        if not (0.0 < self.skip < 1.0):
            raise FormatError(f"skip fraction {self.skip} must be in (0, 1), e.g. 'act:0.4'")

    def __str__(self) -> str:
        return f"act:{_fmt_float(self.skip)}"

    @classmethod
    def parse_args(cls, args):
        if len(args) != 1:
            raise FormatError("activation-sparsity format is 'act:S' (S the skipped fraction), e.g. 'act:0.4'")
        return cls(skip=_parse_float(args[0], "skip fraction"))

    @classmethod
    def example(cls):
        return cls(0.5)

    def record(self):
        return {"skip": self.skip}

    @classmethod
    def from_record(cls, entry):
        return cls(float(entry["skip"]))

    @classmethod
    def settings(cls, N, K, grid=()):
        return [cls(float(s)) for s in grid]

    def curve_key(self, N, K):
        return (float(self.skip),)

    def cost_note(self, M):
        if M <= 1:
            return ""
        return (f"; a launch of {M} tokens reads the union of their kept inputs (of independent tokens, "
                f"{100.0 * (1.0 - self.skip ** M):.0f}% of the weight)")


@dataclass(frozen=True)
class ActRot(Act):
    """Activation sparsity on rotated inputs: each token's inputs first turned into the layer's
    principal axes (Q, K x K, orthonormal, from the calibration Gram: y = (x Q)(W Q)^T, exact), and
    it is the rotated inputs under the threshold that are skipped. The rotation gathers a token's
    energy onto fewer axes, so skipping the same fraction drops less of the output; it costs one
    K x K product per token, which layers reading one input share (gate and up), so it pays where
    those layers are wide next to their input (S N > K)."""

    family: ClassVar[str] = "actrot"
    syntax: ClassVar[str] = "actrot:S"
    shares_input_work: ClassVar[bool] = True

    def __post_init__(self):
        if not (0.0 < self.skip < 1.0):
            raise FormatError(f"skip fraction {self.skip} must be in (0, 1), e.g. 'actrot:0.4'")

    def __str__(self) -> str:
        return f"actrot:{_fmt_float(self.skip)}"

    @classmethod
    def parse_args(cls, args):
        if len(args) != 1:
            raise FormatError("rotated activation-sparsity format is 'actrot:S' (S the skipped fraction), "
                              "e.g. 'actrot:0.4'")
        return cls(skip=_parse_float(args[0], "skip fraction"))

    def cost_note(self, M):
        return "; the time includes the product with the K x K rotation" + super().cost_note(M)


@dataclass(frozen=True)
class PlusLowRank(FormatSpec):
    """A sparse weight plus a low-rank term: W ~= S + U V, S in the ``base`` format, U: N x R,
    V: R x K. The rank-R term is fitted to what the sparse part leaves out, so a small R buys back
    much of the error for a few percent more bytes. Subclasses fix the sparse family."""

    pruned_part: ClassVar[bool] = True  # both sparse bases prune
    param_label: ClassVar[str] = "rank fraction"  # as low rank: a larger rank, never faster
    rank: int

    @property
    def base(self) -> FormatSpec:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    @property
    def lowrank(self) -> "LowRank":
        return LowRank(self.rank)

    def __post_init__(self):
        if self.rank < 1:
            raise FormatError(f"rank {self.rank} must be at least 1")

    def __str__(self) -> str:
        return f"{self.base}+lowrank:{self.rank}"

    def check(self, N, K):
        return self.base.check(N, K) or self.lowrank.check(N, K)

    def stored_params(self, N, K):
        return self.base.stored_params(N, K) + self.lowrank.stored_params(N, K)

    @classmethod
    def parse_args(cls, args):
        raise FormatError(f"the composite format is written '{cls.syntax}', e.g. '{cls.example()}'")

    @classmethod
    def of(cls, base: FormatSpec, rank: int) -> "PlusLowRank":  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def record(self):
        return {**self.base.record(), "rank": self.rank}

    @classmethod
    def settings(cls, N, K, grid=()):
        """``grid`` holds (base setting's record, rank as a fraction of min(N, K)) pairs."""
        base_cls = type(cls.example().base)
        out = []
        for base_record, fraction in grid:
            rank = max(1, round(fraction * min(N, K)))
            out.append(cls.of(base_cls.from_record(base_record), rank))
        return list(dict.fromkeys(out))

    def curve_key(self, N, K):
        return (*self.base.curve_key(N, K), self.rank / min(N, K))

    def label(self, N, K):
        return f"{self.base.label(N, K)}+lowrank@{self.rank / min(N, K):g}"

    @classmethod
    def from_label(cls, label, N, K):
        if "+lowrank@" in label:
            base, fraction = label.split("+lowrank@")
            base_spec = parse_spec(base) if ":" in base or base in FAMILIES else None
            if base_spec is not None:
                return cls.of(base_spec, max(1, round(float(fraction) * min(N, K))))
        return parse_spec(label)

    def parts(self, N, K) -> "list[FormatSpec]":
        """The formats it runs as, one after the other, each over the whole N x K."""
        return [self.base, self.lowrank]


@dataclass(frozen=True)
class TwoFourPlusLowRank(PlusLowRank):
    """2:4 plus a rank-R term: ``2:4+lowrank:R``."""

    family: ClassVar[str] = "2:4+lowrank"
    syntax: ClassVar[str] = "2:4+lowrank:R"

    @property
    def base(self) -> TwoFour:
        return TwoFour()

    @classmethod
    def of(cls, base, rank):
        if not isinstance(base, TwoFour):
            raise FormatError(f"'{cls.family}' takes a 2:4 base, got {base}")
        return cls(rank)

    @classmethod
    def example(cls):
        return cls(16)

    @classmethod
    def from_record(cls, entry):
        return cls(int(entry["rank"]))


@dataclass(frozen=True)
class BlockPlusLowRank(PlusLowRank):
    """Block-sparse plus a rank-R term: ``block:B:D+lowrank:R``."""

    family: ClassVar[str] = "block+lowrank"
    syntax: ClassVar[str] = "block:B:D+lowrank:R"
    group_label: ClassVar[str] = "block size, kept fraction"
    block: int = 64
    density: float = 0.25

    def __post_init__(self):
        super().__post_init__()
        Block(self.block, self.density)  # raises FormatError for impossible block settings

    @property
    def base(self) -> Block:
        return Block(self.block, self.density)

    @classmethod
    def of(cls, base, rank):
        if not isinstance(base, Block):
            raise FormatError(f"'{cls.family}' takes a block base, got {base}")
        return cls(rank, base.block, base.density)

    @classmethod
    def example(cls):
        return cls(16, 64, 0.25)

    @classmethod
    def from_record(cls, entry):
        return cls(int(entry["rank"]), int(entry["block"]), float(entry["density"]))


FAMILIES: dict[str, type[FormatSpec]] = {
    cls.family: cls for cls in (Dense, TwoFour, Block, LowRank, Monarch, Act, ActRot, TwoFourPlusLowRank,
                                BlockPlusLowRank)
}
STRUCTURED_FAMILIES = tuple(f for f in FAMILIES if f != Dense.family)


def parse_spec(text: "str | FormatSpec") -> FormatSpec:
    """Parse a format name such as ``block:64:0.25``; raise FormatError naming what is wrong."""
    if isinstance(text, FormatSpec):
        return text
    if not isinstance(text, str) or not text.strip():
        raise FormatError(f"format must be a non-empty string, got {text!r}")
    text = text.strip()
    if "+" in text:
        return _parse_composite(text)
    family, *args = (text, ) if text in FAMILIES else text.split(":")
    cls = FAMILIES.get(family)
    if cls is None:
        known = ", ".join(c.syntax for c in FAMILIES.values())
        raise FormatError(f"unknown format {text!r}; known formats: {known}")
    return cls.parse_args(args)


def _parse_composite(text: str) -> FormatSpec:
    """``<sparse format>+lowrank:R``."""
    base_text, _, rest = text.partition("+")
    composites = ", ".join(c.syntax for c in FAMILIES.values() if issubclass(c, PlusLowRank))
    rest_family, *rest_args = rest.split(":")
    if rest_family != "lowrank" or len(rest_args) != 1 or "+" in rest:
        raise FormatError(f"unknown composite format {text!r}: the second part must be 'lowrank:R'; "
                          f"known composites: {composites}")
    base = parse_spec(base_text)
    cls = FAMILIES.get(f"{base.family}+lowrank")
    if cls is None:
        raise FormatError(f"no composite of {base.family} and a low-rank term ({text!r}); known composites: {composites}")
    return cls.of(base, _parse_int(rest_args[0], "rank"))


def family_of(text: str) -> str:
    """The family ('block', 'lowrank', '2:4+lowrank', ...) of a format name, or the name itself for 'auto'."""
    if text == "auto" or text in FAMILIES:
        return text
    if "+" in text:
        base, _, rest = text.partition("+")
        return f"{family_of(base)}+{family_of(rest)}"
    return text.split(":")[0]


def _parse_int(s: str, what: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise FormatError(f"{what} {s!r} is not an integer") from None


def _parse_float(s: str, what: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise FormatError(f"{what} {s!r} is not a number") from None
    if not math.isfinite(v):
        raise FormatError(f"{what} {s!r} is not finite")
    return v


def _fmt_float(v: float) -> str:
    return f"{v:g}"

"""Cost models: how long a load and a batch take, from a device profile refined by what the engine measures.

- Load seconds of a model = ``load_latency_s + bytes / bandwidth`` of the tier it comes from.
- Execution seconds of a batch = ``a + b * tokens`` per model: ``a`` is the per-batch overhead and ``b``
  the per-token time. The prior comes from the profile (``b`` from the model's parameter count and the
  device's sustained FLOP/s); measurements refine both online (least squares with exponential forgetting).
- A step that loads its model while computing (layer-by-layer pipelining) takes
  ``max(load, exec) + min(load, exec) / pipeline_stages``.
- Around the batch, a step costs ``step_overhead_s`` plus ``request_overhead_s`` per request: the CPU work
  of admitting, scheduling and delivering each request (and, on a CPU device, the serving thread's share
  of the same cores). A background copy slows the compute it overlaps by ``copy_slowdown`` of its length.
  These three are fitted by a calibration replay through the real engine (``ptmserve.bench.trace_calibrate``);
  the simulator charges them, the scheduler's predictions do not use them.

Pure Python, no torch: the same numbers drive the real scheduler and the simulator.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path

from ptmserve.errors import InvalidConfig


class Tier(str, Enum):
    """Where a model's weights are when a load starts."""

    DEVICE = "device"  # already resident: no load
    HOST = "host"  # host-memory cache: host-to-device copy
    DISK = "disk"  # repository files: read, then copy


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    """What a device can do, measured or taken from its datasheet. Serialises to and from JSON."""

    name: str = "cpu-2core"
    host_to_device_bps: float = 5.0e9  # bytes/s from the host tier into a device slot
    disk_to_host_bps: float = 1.0e9  # bytes/s from the repository into the host tier (cold reads)
    load_latency_s: float = 0.002  # fixed cost of one load (slot bookkeeping, first touch)
    batch_overhead_s: float = 0.010  # fixed cost of one batch (the ``a`` prior)
    flops: float = 6.5e10  # sustained FLOP/s on encoder batches (sets the ``b`` prior)
    bytes_per_param: float = 4.0  # 4 for fp32 weights, 2 for bf16/fp16
    pipeline_stages: int = 8  # groups a load overlaps compute over (layers + 2); 1 = no pipelining
    copy_overlap: float = 0.5  # share of a copy hidden behind compute: 1 = own copy engine, 0 = same cores
    # seconds of compute lost per second of a background copy it overlaps; None: 1 - copy_overlap
    copy_slowdown: float | None = None
    request_overhead_s: float = 0.0  # CPU seconds per request outside the batch (admit, deliver, serve)
    step_overhead_s: float = 0.0  # CPU seconds per step outside the batch (schedule, report)
    notes: str = ""  # how the figures were obtained

    def __post_init__(self) -> None:
        for name in ("host_to_device_bps", "disk_to_host_bps", "flops", "bytes_per_param"):
            if not getattr(self, name) > 0:
                raise InvalidConfig(
                    f"device profile {self.name!r}: {name} must be > 0, got {getattr(self, name)}"
                )
        for name in ("load_latency_s", "batch_overhead_s", "request_overhead_s", "step_overhead_s"):
            if getattr(self, name) < 0:
                raise InvalidConfig(
                    f"device profile {self.name!r}: {name} must be >= 0, got {getattr(self, name)}"
                )
        if self.pipeline_stages < 1:
            raise InvalidConfig(f"device profile {self.name!r}: pipeline_stages must be >= 1")
        if not 0 <= self.copy_overlap <= 1:
            raise InvalidConfig(f"device profile {self.name!r}: copy_overlap must be in [0, 1]")
        if self.copy_slowdown is not None and not 0 <= self.copy_slowdown <= 1:
            raise InvalidConfig(
                f"device profile {self.name!r}: copy_slowdown must be in [0, 1], got {self.copy_slowdown}"
            )

    @property
    def contention(self) -> float:
        """Seconds of compute lost per second of a background copy overlapping it."""
        return 1.0 - self.copy_overlap if self.copy_slowdown is None else self.copy_slowdown

    def overhead_seconds(self, requests: int) -> float:
        """CPU seconds a step of ``requests`` requests costs outside its batch's compute."""
        return self.step_overhead_s + self.request_overhead_s * requests

    def token_seconds(self, nbytes: int) -> float:
        """Prior per-token execution time of a model with ``nbytes`` of weights (2 FLOPs per parameter)."""
        return 2.0 * (nbytes / self.bytes_per_param) / self.flops

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> DeviceProfile:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidConfig(f"device profile: unknown keys {unknown}")
        return cls(**data)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: str | Path) -> DeviceProfile:
        """Read a profile from a JSON file; a bare name selects one of ``PROFILES``."""
        if str(path) in PROFILES:
            return PROFILES[str(path)]
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise InvalidConfig(f"cannot read device profile {str(path)!r}: {exc}") from exc
        return cls.from_dict(data)


# Profiles the benchmarks use. "cpu-2core" is provisional: HF BertModel runs of the real all-MiniLM-L6-v2
# (fp32) and copies of its 91 MB on the shared 2-core development machine, noisy (docs/benchmarks.md);
# "gpu-pcie4" is a datasheet-level accelerator: PCIe 4.0 x16 pinned copies, ~40 TFLOP/s sustained bf16.
PROFILES: dict[str, DeviceProfile] = {
    "cpu-2core": DeviceProfile(
        notes="provisional: MiniLM-L6 fp32 on 2 shared cores (HF BertModel), copies of its 91 MB weights",
    ),
    "gpu-pcie4": DeviceProfile(
        name="gpu-pcie4",
        host_to_device_bps=24e9,
        disk_to_host_bps=3e9,
        load_latency_s=0.001,
        batch_overhead_s=0.002,
        flops=4e13,
        bytes_per_param=2.0,
        pipeline_stages=8,
        copy_overlap=1.0,
        notes="datasheet-level: PCIe 4.0 x16 pinned copies, 40 TFLOP/s sustained bf16",
    ),
}


@dataclass(slots=True)
class LinearFit:
    """``y = a + b * x`` fitted by least squares with exponential forgetting, anchored by a prior.

    The prior enters as two pseudo-observations (at ``x = 0`` and ``x = x_ref``) of weight ``prior_weight``
    that never decay, so the fit is defined from the first call and measurements dominate after a few.
    """

    a0: float
    b0: float
    x_ref: float = 256.0
    prior_weight: float = 0.2
    forget: float = 0.05  # each new observation scales older ones by (1 - forget)
    err: float = 0.05  # running mean of |measured - predicted| / predicted (EWMA, weight 2 * forget)
    a: float = field(init=False)
    b: float = field(init=False)
    _sw: float = 0.0
    _sx: float = 0.0
    _sy: float = 0.0
    _sxx: float = 0.0
    _sxy: float = 0.0

    def __post_init__(self) -> None:
        self.a, self.b = self.a0, self.b0

    def __call__(self, x: float) -> float:
        return self.a + self.b * x

    def observe(self, x: float, y: float) -> None:
        if not (math.isfinite(x) and math.isfinite(y)) or y < 0:
            return
        predicted = max(self(x), 1e-9)
        # One outlier (a first call's warm-up, a stall) must not wreck the fit: an observation moves the
        # fit by at most 4x, the error margin by a bounded step; a real change takes a few observations.
        self.err += 2 * self.forget * (min(abs(y - predicted) / predicted, 1.0) - self.err)
        y = min(max(y, predicted / 4), predicted * 4)
        k = 1.0 - self.forget
        self._sw = self._sw * k + 1.0
        self._sx = self._sx * k + x
        self._sy = self._sy * k + y
        self._sxx = self._sxx * k + x * x
        self._sxy = self._sxy * k + x * y
        w, r = self.prior_weight, self.x_ref
        y_ref = self.a0 + self.b0 * r
        sw = self._sw + 2 * w
        sx = self._sx + w * r
        sy = self._sy + w * (self.a0 + y_ref)
        sxx = self._sxx + w * r * r
        sxy = self._sxy + w * r * y_ref
        det = sw * sxx - sx * sx
        if det <= 0:
            return
        b = (sw * sxy - sx * sy) / det
        a = (sy - b * sx) / sw
        if b < 0:  # constrained refits: times never fall with tokens, overheads are never negative
            a, b = sy / sw, 0.0
        elif a < 0:
            a, b = 0.0, sxy / sxx
        self.a, self.b = a, b


class CostModel:
    """Predicts load and execution seconds; ``observe_*`` refine the predictions online.

    Per-model execution fits can be seeded from a profile run (``set_exec``); otherwise they start from
    the device profile and the model's weight bytes.
    """

    def __init__(
        self, profile: DeviceProfile = PROFILES["cpu-2core"], *, forget: float = 0.05, load_alpha: float = 0.2
    ) -> None:
        self.profile = profile
        self._forget = forget
        self._load_alpha = load_alpha
        self._max_ab = (0.0, 0.0)  # running maxima of a and b (with margins) over fits: never decrease
        self._exec: dict[str, LinearFit] = {}
        self._bps = {Tier.HOST: profile.host_to_device_bps, Tier.DISK: profile.disk_to_host_bps}
        # model -> bytes of all its weights, where they differ from its device bytes (groups placed in
        # the host tier compute too): what a model's prior execution cost is taken from
        self._compute_bytes: dict[str, int] = {}

    def set_compute_bytes(self, model: str, nbytes: int) -> None:
        """The bytes of all of ``model``'s weights, for its prior execution cost (callers pass its device
        bytes, which leave out the groups placed in the host tier)."""
        self._compute_bytes[model] = nbytes

    def _fit(self, model: str, nbytes: int) -> LinearFit:
        fit = self._exec.get(model)
        if fit is None:
            nbytes = self._compute_bytes.get(model, nbytes)
            p = self.profile
            fit = LinearFit(p.batch_overhead_s, p.token_seconds(nbytes), forget=self._forget)
            if nbytes > 0:  # a prior from unknown bytes would anchor the fit at zero per-token cost
                self._exec[model] = fit
                self._raise_max(fit)
        return fit

    def set_exec(self, model: str, a: float, b: float) -> None:
        """Seed ``model``'s execution fit with profiled ``a`` (s per batch) and ``b`` (s per token)."""
        self._exec[model] = LinearFit(a, b, forget=self._forget)
        self._raise_max(self._exec[model])

    def exec_seconds(self, model: str, tokens: int, nbytes: int = 0) -> float:
        """Predicted seconds to run one batch of ``tokens`` tokens on ``model`` (weights of ``nbytes``)."""
        return self._fit(model, nbytes)(tokens)

    def exec_params(self, model: str, nbytes: int = 0) -> tuple[float, float]:
        fit = self._fit(model, nbytes)
        return fit.a, fit.b

    def max_exec_seconds(self, tokens: int, nbytes: int) -> float:
        """An upper bound of ``exec_seconds(m, tokens)`` (margin included) over every model ``m`` fitted so
        far and a model of ``nbytes`` not seen yet."""
        a, b = self._max_ab
        p = self.profile
        return max(a, p.batch_overhead_s) + max(b, p.token_seconds(nbytes)) * tokens

    def _raise_max(self, fit: LinearFit) -> None:
        margin = 1 + 2 * fit.err
        self._max_ab = (max(self._max_ab[0], fit.a * margin), max(self._max_ab[1], fit.b * margin))

    def exec_margin(self, model: str) -> float:
        """Factor to stretch ``model``'s predicted execution time by when a deadline depends on it:
        1 + twice its recent mean relative error."""
        fit = self._exec.get(model)
        return 1.0 + 2.0 * fit.err if fit else 1.0

    def load_seconds(self, nbytes: int, source: Tier = Tier.HOST) -> float:
        """Predicted seconds to make ``nbytes`` of weights resident on the device from ``source``."""
        if source is Tier.DEVICE:
            return 0.0
        seconds = self.profile.load_latency_s + nbytes / self._bps[Tier.HOST]
        if source is Tier.DISK:
            seconds += nbytes / self._bps[Tier.DISK]
        return seconds

    def step_seconds(self, load_s: float, exec_s: float) -> float:
        """Wall time of a step that loads for ``load_s`` while computing for ``exec_s``: between fully
        serial and fully pipelined (``max + min / stages``), as far as the device overlaps copies."""
        if load_s <= 0:
            return exec_s
        serial = load_s + exec_s
        pipelined = max(load_s, exec_s) + min(load_s, exec_s) / self.profile.pipeline_stages
        return serial - self.profile.copy_overlap * (serial - pipelined)

    def observe_exec(self, model: str, tokens: int, seconds: float, nbytes: int = 0) -> None:
        """Fold one measured batch (``tokens`` tokens took ``seconds``) into ``model``'s fit."""
        fit = self._exec[model] = self._fit(model, nbytes)  # kept even without a size: it has data now
        fit.observe(float(tokens), seconds)
        self._raise_max(fit)

    def observe_load(self, nbytes: int, seconds: float, source: Tier = Tier.HOST) -> None:
        """Fold one measured load into the bandwidth of ``source`` (EWMA). Loads from disk are taken
        as a read followed by a copy, so they refine the disk bandwidth only."""
        if source is Tier.DEVICE or nbytes <= 0 or not math.isfinite(seconds):
            return
        moving = seconds - self.profile.load_latency_s
        if source is Tier.DISK:
            moving -= nbytes / self._bps[Tier.HOST]
        if moving <= 0:
            return
        self._bps[source] += self._load_alpha * (nbytes / moving - self._bps[source])

    def bandwidth(self, source: Tier) -> float:
        """Current estimate of bytes/s into the device from ``source`` (disk: into the host tier)."""
        return self._bps[source]

"""What shapes a synthdrive frame: :class:`SynthConfig`, the generator version and the label IDs."""

from __future__ import annotations

from dataclasses import dataclass, field

from oodfast.data.classes import CLASS_NAMES, RARE_CLASS_IDS
from oodfast.data.crops import DEFAULT_RARE_TAU

#: Bump when a change alters the pixels drawn for a given (seed, index): cached datasets are keyed on it.
GENERATOR_VERSION = 1

#: BDD train IDs of the classes synthdrive draws (255, the ego vehicle's bonnet, is ``IGNORE_ID``).
ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEG, TERRAIN, SKY = range(11)
PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE = range(11, 19)


@dataclass(frozen=True)
class SynthConfig:
    """Everything that shapes a synthdrive frame. Defaults give BDD-like frames and the paper's tail.

    Attributes:
        width, height: frame size in pixels (BDD: 1280x720).
        rare_image_prob: probability that a frame holds at least one rare object.
        rare_extra_mean: mean number of further rare objects in such a frame (Poisson).
        rare_weights: relative frequency of each rare class among rare objects (long-tailed itself).
        cars_mean, trucks_mean, buses_mean: mean count per frame (Poisson) of the common vehicles.
        night_prob, dusk_prob: time of day; the rest is daytime.
        overcast_prob, fog_prob, rain_prob: weather; the rest is clear.
        hood_prob: probability that the ego vehicle's bonnet is visible (label 255, as in BDD).
        jpeg_quality: JPEG quality of the written frames.
        crops_per_image: random global crops per frame used to measure the rare prevalence.
        rare_tau: rare-pixel share that makes a crop rare when measuring the prevalence.
    """

    width: int = 1280
    height: int = 720
    rare_image_prob: float = 0.25
    rare_extra_mean: float = 0.35
    rare_weights: dict[str, float] = field(
        default_factory=lambda: {
            "person": 0.28, "traffic sign": 0.18, "traffic light": 0.14, "pole": 0.12,
            "bicycle": 0.09, "rider": 0.08, "motorcycle": 0.07, "train": 0.04,
        }
    )
    cars_mean: float = 3.0
    trucks_mean: float = 0.45
    buses_mean: float = 0.25
    night_prob: float = 0.2
    dusk_prob: float = 0.12
    overcast_prob: float = 0.25
    fog_prob: float = 0.08
    rain_prob: float = 0.07
    hood_prob: float = 0.4
    jpeg_quality: int = 90
    crops_per_image: int = 16
    rare_tau: float = DEFAULT_RARE_TAU

    def __post_init__(self) -> None:
        if self.width < 64 or self.height < 64:
            raise ValueError(f"synthdrive frames must be at least 64x64, got {self.width}x{self.height}")
        unknown = set(self.rare_weights) - {CLASS_NAMES[i] for i in RARE_CLASS_IDS}
        if unknown:
            raise ValueError(
                f"rare_weights names unknown rare classes {sorted(unknown)}; rare classes are "
                f"{[CLASS_NAMES[i] for i in RARE_CLASS_IDS]}"
            )
        if not self.rare_weights or min(self.rare_weights.values()) < 0 or sum(self.rare_weights.values()) <= 0:
            raise ValueError(f"rare_weights must be non-negative with a positive sum, got {self.rare_weights}")
        for name in ("rare_image_prob", "night_prob", "dusk_prob", "overcast_prob", "fog_prob",
                     "rain_prob", "hood_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        if self.night_prob + self.dusk_prob > 1 or self.overcast_prob + self.fog_prob + self.rain_prob > 1:
            raise ValueError("time-of-day and weather probabilities must each sum to at most 1")

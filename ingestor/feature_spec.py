"""What FEATURES.md fixes as data: the indicator parameters with their defaults, the bar lengths,
and the columns of the ``features`` table.

Apart from the feature engine because the layers below it need them: ``Settings``
(``ingestor.config``) holds a :class:`FeatureSettings`, and the COPY encoding
(``ingestor.wire.rows``) writes the ``features`` columns. Pure data, no imports of the project.
"""

from __future__ import annotations

from dataclasses import dataclass

# Bar lengths, in seconds, that FEATURES.md allows.
VALID_BAR_SECONDS = (1, 5, 15, 60, 300)

# The ``features`` columns the indicators fill, in table order (bar identity columns are the caller's).
BAR_COLUMNS = (
    "open", "high", "low", "close", "volume", "buy_volume", "sell_volume", "trades", "quote_volume",
)  # fmt: skip
FEATURE_COLUMNS = BAR_COLUMNS + (
    "delta", "cvd", "bull_div", "bear_div",
    "ret", "rv", "vol_z", "volu_z", "panic_index",
    "absorption",
    "liq_long_notional", "liq_short_notional", "liq_notional", "liq_intensity", "cascade_exhaustion",
    "obi",
    "buy_wall_price", "buy_wall_qty", "dist_to_buy_wall", "buy_wall_age_s",
    "sell_wall_price", "sell_wall_qty", "dist_to_sell_wall", "sell_wall_age_s",
    "fp_buy_imb", "fp_sell_imb", "fp_imbalance", "fp_stacked_buy", "fp_stacked_sell",
    "signal", "stop_price", "take_profit",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class FeatureSettings:
    """Every parameter of FEATURES.md, with its documented default."""

    bar_seconds: int = 60
    bar_close_delay_ms: int = 1500
    window: int = 60  # W: rolling statistics over the previous W bars
    div_bars: int = 20  # N: divergence lookback
    liq_half_life: float = 3.0  # H, in bars
    cascade_bars: int = 10  # K: peak window, including the current bar
    obi_levels: int = 10
    wall_band_pct: float = 2.0
    wall_factor: float = 5.0
    wall_min_levels: int = 5
    footprint_bps: float = 1.0
    fp_ratio: float = 3.0  # R
    fp_min_vol_frac: float = 0.01  # min_vol = 1% of the bar's volume
    # 4.8 composite signal
    panic_bars: int = 5
    panic_threshold: float = 2.0
    wall_dist_pct: float = 0.5
    absorption_bars: int = 3
    absorption_threshold: float = 1.0
    stacked_min: int = 3
    div_trigger_bars: int = 3
    stop_bars: int = 3
    stop_buffer_bps: float = 5.0
    rr: float = 2.0
    min_quote_volume: float = 0.0

    def __post_init__(self) -> None:
        if self.bar_seconds not in VALID_BAR_SECONDS:
            raise ValueError(f"bar_seconds must be one of {VALID_BAR_SECONDS}, not {self.bar_seconds}")
        counts = ("window", "div_bars", "cascade_bars", "obi_levels", "panic_bars", "absorption_bars",
                  "div_trigger_bars", "stop_bars")  # fmt: skip
        for name in counts:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not self.liq_half_life > 0:
            raise ValueError("liq_half_life must be > 0")
        if self.bar_close_delay_ms < 0:
            raise ValueError("bar_close_delay_ms must be >= 0")

    @property
    def liq_alpha(self) -> float:
        """EMA weight of the newest bar: the weight of older bars halves every ``H`` bars."""
        return 1.0 - 0.5 ** (1.0 / self.liq_half_life)

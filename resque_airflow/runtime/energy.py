"""Energy and emissions of a block of work, measured by codecarbon offline (no network); NaN when it cannot be.

:class:`EnergyMeter` wraps codecarbon's ``OfflineEmissionsTracker`` around the block; every failure inside
codecarbon becomes NaN and one warning, never an exception, so a training run is never lost to its meter.
:func:`validate_country_iso_code` checks the energy-mix country first, since the tracker swallows an unknown code.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings

from resque_airflow.errors import ResqueInputError

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _known_country_codes() -> frozenset[str] | None:
    try:
        from codecarbon.input import DataSource

        return frozenset(DataSource().get_global_energy_mix_data())
    except Exception as exc:  # codecarbon missing or its data moved: energy is then not measured at all
        log.warning("codecarbon: cannot read its country data (%s); energy and emissions will be NaN", exc)
        return None


def validate_country_iso_code(code: str) -> str:
    """Return ``code`` (upper-cased) if codecarbon knows its energy mix, else raise :class:`ResqueInputError`.

    codecarbon's tracker swallows an unknown country code and reports nonsense, so it is checked here first.
    When codecarbon's data cannot be read at all, the code is returned unchecked (energy will be NaN anyway).
    """
    if not isinstance(code, str) or len(code.strip()) != 3:
        raise ResqueInputError(
            f"country_iso_code: expected a 3-letter ISO 3166-1 alpha-3 code such as 'USA', got {code!r}"
        )
    code = code.strip().upper()
    known = _known_country_codes()
    if known is not None and code not in known:
        raise ResqueInputError(
            f"country_iso_code: codecarbon has no energy mix for {code!r}; use an ISO 3166-1 alpha-3 code it knows "
            f"(e.g. 'USA', 'FRA', 'DEU'; {len(known)} known)"
        )
    return code


class EnergyMeter:
    """codecarbon ``OfflineEmissionsTracker`` around a block; NaN (and one warning) if anything in it fails."""

    def __init__(self, country_iso_code: str, enabled: bool) -> None:
        self.country = country_iso_code
        self.enabled = enabled
        self.tracker = None
        self.energy_kwh = math.nan
        self.emissions_kg = math.nan

    def __enter__(self) -> EnergyMeter:
        if not self.enabled:
            return self
        try:
            from codecarbon import OfflineEmissionsTracker

            # codecarbon logs at INFO/WARNING on every tracker; keep the run's log readable.
            logging.getLogger("codecarbon").setLevel(logging.ERROR)
            with warnings.catch_warnings():
                # codecarbon 3 deprecates save_to_file in favour of output_methods; False is still honoured.
                warnings.simplefilter("ignore", DeprecationWarning)
                self.tracker = OfflineEmissionsTracker(
                    country_iso_code=self.country, save_to_file=False, log_level="error"
                )
            self.tracker.start()
        except Exception as exc:
            log.warning("codecarbon: could not start the tracker (%s); energy and emissions recorded as NaN", exc)
            self.tracker = None
        return self

    def __exit__(self, *exc_info) -> None:
        if self.tracker is None:
            return
        try:
            emissions = self.tracker.stop()
            data = self.tracker.final_emissions_data
            self.emissions_kg = float(emissions) if emissions is not None else math.nan
            self.energy_kwh = float(data.energy_consumed) if data is not None else math.nan
        except Exception as exc:
            log.warning("codecarbon: could not stop the tracker (%s); energy and emissions recorded as NaN", exc)

"""An estimate of a run's energy and emissions, written to `DIR/energy.json` at its end.

Where it can, codecarbon measures (offline, no network): NVIDIA GPUs' power through NVML,
the CPU's through RAPL where the kernel exposes it, otherwise from the CPU's load and its
TDP (4 W per thread for a CPU codecarbon does not know), and the memory from its size.
It runs on one host and sees only that host, so TPUs (which it cannot read) and runs of
several processes take the chip table instead: devices x power per device
(`jaxtrain.hardware`, or `config.energy.device_watts`) x wall time. Emissions are the
energy times `config.energy.grid_kg_co2e_per_kwh`. Either way it is an estimate, and the
file says so and how it was made.

Each run adds one record to the file, so a resumed run's file holds every part that
ended (finished, stopped or failed; a killed process writes nothing) and their total. A
file that cannot be written is the run's StorageError (exit 74), like its other files.
"""

import json
import logging as std_logging
import os
import threading
import time

import jax
from absl import logging

from jaxtrain import files, hardware, metrics
from jaxtrain.checks import is_number, require

ENERGY_FILE = "energy.json"


def check_config(energy_config) -> None:
    """Rejects a bad `config.energy`.

    Raises:
      ConfigError: naming the field and why.
    """
    for key in ("device_watts", "grid_kg_co2e_per_kwh"):
        value = energy_config[key]
        require(is_number(value) and value >= 0, f"energy.{key}", value, "a number >= 0")


class EnergyMeter:
    """Measures (or estimates) energy from its creation to `stop`.

    codecarbon starts measuring when `track` is called (the training loop's start): its
    hardware probe takes about a second and a third of a second of CPU, which would
    otherwise delay the start-up it runs beside. The seconds before are counted at the
    average power it then measures.

    Args:
      energy_config: `config.energy` (device_watts, grid_kg_co2e_per_kwh).
      devices: the devices the run computes on (all processes').
    """

    def __init__(self, energy_config, devices):
        check_config(energy_config)
        self._config = energy_config
        self._devices = list(devices)
        self._start = time.monotonic()
        self._tracker = None
        self._started = None

    def track(self) -> None:
        """Starts codecarbon, in the background, where it applies (see the module doc)."""
        platform = self._devices[0].platform
        if (
            self._started is None
            and not self._config.device_watts
            and platform in ("cpu", "gpu")
            and jax.process_count() == 1
        ):
            self._started = threading.Thread(
                target=self._start_tracker, name="jaxtrain-energy", daemon=True
            )
            self._started.start()

    def _start_tracker(self):
        try:
            from codecarbon import OfflineEmissionsTracker

            # Its info lines and warnings (an unknown CPU model, other trackers running)
            # would interleave with the run's own output; errors still show. Set after
            # the import, which sets its level, and before the tracker logs.
            std_logging.getLogger("codecarbon").setLevel(std_logging.ERROR)

            tracker = OfflineEmissionsTracker(
                country_iso_code="USA",  # required; unused: emissions use our grid figure
                tracking_mode="process",  # this process's share of a shared machine
                save_to_file=False,
                log_level="error",
                allow_multiple_runs=True,
            )
            tracker.start()
            self._tracker = tracker
        except Exception as e:  # an estimate must never stop a run
            logging.warning("codecarbon could not start (%s); energy from the chip table", e)

    def stop(self) -> dict:
        """Ends the measurement; returns this run's record (see the module docstring)."""
        seconds = time.monotonic() - self._start
        record = {"seconds": round(seconds, 3)}
        record.update(self._measured(seconds) or self._from_table(seconds))
        kwh = record.get("energy_kwh")
        intensity = float(self._config.grid_kg_co2e_per_kwh)
        record["grid_kg_co2e_per_kwh"] = intensity
        record["emissions_kg_co2e"] = None if kwh is None else kwh * intensity
        return record

    def _measured(self, seconds: float) -> dict | None:
        if self._started is not None:
            self._started.join(timeout=30)
        if self._tracker is None:
            return None
        try:
            self._tracker.stop()
            data = self._tracker.final_emissions_data
        except Exception as e:
            logging.warning("codecarbon failed (%s); energy from the chip table", e)
            return None
        import codecarbon

        # The seconds before codecarbon started (start-up) at the power it measured.
        scale = seconds / data.duration if data.duration > 0 else 1.0
        return {
            "method": f"codecarbon {codecarbon.__version__}, offline, this process's share; "
            f"{seconds - data.duration:.1f} s of start-up at the measured average power",
            "energy_kwh": float(data.energy_consumed) * scale,
            "parts_kwh": {
                "cpu": float(data.cpu_energy) * scale,
                "gpu": float(data.gpu_energy) * scale,
                "ram": float(data.ram_energy) * scale,
            },
            "hardware": {"cpu": data.cpu_model, "gpu": data.gpu_model},
        }

    def _from_table(self, seconds: float) -> dict:
        device = self._devices[0]
        watts = self._config.device_watts or hardware.tdp_watts(device)
        source = "config.energy.device_watts" if self._config.device_watts else "chip table TDP"
        count = len(self._devices)
        if not watts:
            return {
                "method": f"none: no power known for {device.device_kind!r} "
                "(set config.energy.device_watts)",
                "energy_kwh": None,
            }
        return {
            "method": f"{count} x {device.device_kind} at {watts:g} W ({source}) x wall time",
            "energy_kwh": count * watts * seconds / 3.6e6,
        }


def write(workdir: str, record: dict) -> dict:
    """Adds `record` to `workdir/energy.json` (process 0), with the running total.

    A file that is not one of ours (damaged bytes, an edit) is kept as `energy.json.damaged`,
    with a warning, and a new one started: earlier parts' records are never dropped unseen.

    Returns:
      The file's contents.

    Raises:
      StorageError: the file cannot be read or written (disk full, permission), naming it;
        the old file is as it was.
    """
    path = os.path.join(workdir, ENERGY_FILE)
    runs, damaged = [], False
    try:
        with open(path, encoding="utf-8") as f:
            runs = json.load(f)["runs"]
        if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
            raise TypeError("runs is not a list of records")
    except FileNotFoundError:
        pass
    except OSError as e:
        raise files.storage_error("read", path, e) from e
    except (ValueError, KeyError, TypeError):
        runs, damaged = [], True
    runs.append(record)
    known = [r["energy_kwh"] for r in runs if is_number(r.get("energy_kwh"))]
    emissions = [r["emissions_kg_co2e"] for r in runs if is_number(r.get("emissions_kg_co2e"))]
    contents = {
        "estimate": True,
        "note": "an estimate, not a meter reading: see `method` in each run",
        "energy_kwh": sum(known) if known else None,
        "emissions_kg_co2e": sum(emissions) if emissions else None,
        "seconds": sum(r["seconds"] for r in runs if is_number(r.get("seconds"))),
        "runs": runs,
    }
    if jax.process_index() == 0:
        try:
            if damaged:
                os.replace(path, f"{path}.damaged")
                logging.warning("%s is not an energy record; kept as %s.damaged", path, path)
            files.write_atomically(path, json.dumps(contents, indent=2))
        except OSError as e:
            raise files.storage_error("write", path, e) from e
    return contents


def describe(record: dict) -> str:
    """One console line for a run's record."""
    if record.get("energy_kwh") is None:
        return f"energy: no estimate ({record['method']})"
    return (
        f"energy (estimate): {record['energy_kwh'] * 1e3:.3g} Wh, "
        f"{record['emissions_kg_co2e'] * 1e3:.3g} g CO2e at "
        f"{record['grid_kg_co2e_per_kwh']:g} kg/kWh over {record['seconds']:.0f} s "
        f"({record['method']}); see {ENERGY_FILE}"
    )


def finish(meter: EnergyMeter, workdir: str) -> None:
    """Stops `meter`, adds its record to the workdir's file and prints it."""
    record = meter.stop()
    write(workdir, record)
    metrics.console(describe(record))

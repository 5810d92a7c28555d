"""Device memory figures: torch's allocator and NVML's whole-device view.

The paged optimizer keeps its states in CUDA managed memory, which torch.cuda does not count;
NVML's device-used figure does, and it is what nvidia-smi shows. A sampler thread reads it ten
times a second so the recorded peak is the real one, not whatever a logging step happened to see."""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch

logger = logging.getLogger(__name__)

NVML_SAMPLE_INTERVAL_S = 0.1


class MemoryProbe:
    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        self._nvml_handle: Any = None
        self._peak_used = 0
        self._stop = threading.Event()
        if self.cuda:
            self._nvml_handle = self._open_nvml()
        if self._nvml_handle is not None:
            threading.Thread(target=self._sample, name="nvml-sampler", daemon=True).start()

    @staticmethod
    def _open_nvml() -> Any:
        try:
            import pynvml

            pynvml.nvmlInit()
            # CUDA_VISIBLE_DEVICES renumbers devices; the UUID names the same card in both APIs.
            uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
            return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        except Exception as exc:  # no NVML library, or an older driver
            logger.warning("NVML unavailable, device-used memory will not be reported: %s", exc)
            return None

    def _device_memory(self) -> tuple[int, int]:
        import pynvml

        try:
            # v2 leaves out the driver's reserved memory (about 0.5 GiB on an H100), as
            # nvidia-smi does; v1's "used" includes it and reads that much higher.
            info = pynvml.nvmlDeviceGetMemoryInfo(self._nvml_handle, version=pynvml.nvmlMemory_v2)
        except pynvml.NVMLError:
            info = pynvml.nvmlDeviceGetMemoryInfo(self._nvml_handle)
        used = int(info.used)
        self._peak_used = max(self._peak_used, used)
        return used, int(info.total)

    def _sample(self) -> None:
        while not self._stop.wait(NVML_SAMPLE_INTERVAL_S):
            try:
                self._device_memory()
            except Exception:  # the driver went away; the figures stop, training goes on
                return

    def close(self) -> None:
        self._stop.set()

    def read(self) -> dict[str, int | None]:
        if not self.cuda:
            return {}
        figures: dict[str, int | None] = {
            "allocated": torch.cuda.memory_allocated(),
            "reserved": torch.cuda.memory_reserved(),
            "peak_allocated": torch.cuda.max_memory_allocated(),
            "device_used": None,
            "device_total": None,
            "device_used_peak": None,
        }
        if self._nvml_handle is not None:
            figures["device_used"], figures["device_total"] = self._device_memory()
            figures["device_used_peak"] = self._peak_used
        return figures

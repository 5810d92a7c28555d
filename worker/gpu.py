"""Device memory figures: torch's allocator and NVML's whole-device view.

The paged optimizer keeps its states in CUDA managed memory, which torch.cuda does not count;
NVML's device-used figure does, and it is what nvidia-smi shows."""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)


class MemoryProbe:
    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        self._nvml_handle: Any = None
        if self.cuda:
            self._nvml_handle = self._open_nvml()

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

    def read(self) -> dict[str, int | None]:
        if not self.cuda:
            return {}
        figures: dict[str, int | None] = {
            "allocated": torch.cuda.memory_allocated(),
            "reserved": torch.cuda.memory_reserved(),
            "peak_allocated": torch.cuda.max_memory_allocated(),
            "device_used": None,
            "device_total": None,
        }
        if self._nvml_handle is not None:
            import pynvml

            info = pynvml.nvmlDeviceGetMemoryInfo(self._nvml_handle)
            figures["device_used"], figures["device_total"] = int(info.used), int(info.total)
        return figures

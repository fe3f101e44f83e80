"""The host's RAM: how much there is, and the default budget for sleeping engines (80 % of it)."""

from __future__ import annotations

from pathlib import Path

GB = 2**30
DEFAULT_SHARE = 0.8  # residency.host_ram_gb defaults to this share of the host's RAM
MEMINFO = Path("/proc/meminfo")


def host_ram_gb(meminfo: Path = MEMINFO) -> float | None:
    """MemTotal in GB (2**30 bytes), or None when /proc/meminfo cannot say."""
    try:
        text = meminfo.read_text(encoding="ascii")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key == "MemTotal":
            words = rest.split()
            if words and words[0].isdigit():
                return int(words[0]) * 1024 / GB  # the kernel says kB and means KiB
    return None


def default_budget_gb(meminfo: Path = MEMINFO) -> float | None:
    """The host RAM sleeping engines may hold when config.yml sets no residency.host_ram_gb."""
    total = host_ram_gb(meminfo)
    return None if total is None else round(total * DEFAULT_SHARE, 3)

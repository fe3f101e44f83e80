"""router/hostmem.py: the host's RAM from /proc/meminfo and the default sleeper budget."""

from __future__ import annotations

from pathlib import Path

from router import hostmem


def test_memtotal_and_the_default_budget(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemFree:         1024 kB\nMemTotal:       1048576000 kB\nSwapTotal: 0 kB\n")
    assert hostmem.host_ram_gb(meminfo) == 1000.0
    assert hostmem.default_budget_gb(meminfo) == 800.0


def test_unreadable_or_without_memtotal_is_none(tmp_path: Path) -> None:
    assert hostmem.host_ram_gb(tmp_path / "absent") is None
    assert hostmem.default_budget_gb(tmp_path / "absent") is None
    odd = tmp_path / "odd"
    odd.write_text("MemTotal: lots\n")
    assert hostmem.host_ram_gb(odd) is None


def test_this_host() -> None:
    total = hostmem.host_ram_gb()
    assert total is not None and total > 0.1
    assert hostmem.default_budget_gb() == round(total * 0.8, 3)

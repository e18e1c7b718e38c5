"""units: counts with decimal suffixes, sizes with SI and IEC units, one-line errors otherwise."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_inspect.errors import InspectError
from lora_inspect.units import parse_count, parse_size


@pytest.mark.parametrize("text,want", [
    ("4194304", 4_194_304), ("4,194,304", 4_194_304), ("4_194_304", 4_194_304), ("20M", 20_000_000),
    ("1.5k", 1_500), ("2G", 2_000_000_000), ("6.74B", 6_740_000_000), (" 7 M ", 7_000_000), (12, 12),
])
def test_counts(text, want):
    assert parse_count(text) == want


@pytest.mark.parametrize("text,want", [
    ("100MB", 100_000_000), ("1.5GB", 1_500_000_000), ("512MiB", 512 * 1024**2), ("4096", 4096),
    ("10KiB", 10_240), ("2kB", 2_000), ("3TB", 3 * 10**12), ("1GiB", 2**30), ("7B", 7),
])
def test_sizes(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("bad", ["", "M", "20X", "1,00", "1.2.3", "-5", "1e6", "0.5"])
def test_bad_counts(bad):
    with pytest.raises(InspectError) as e:
        parse_count(bad, "--max-params")
    assert "--max-params" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("bad", ["100Mb", "1.5gb", "12XB", "MB", "1,5GB", "1 0MB"])
def test_bad_sizes(bad):
    with pytest.raises(InspectError) as e:
        parse_size(bad, "--max-size")
    assert "--max-size" in str(e.value)


@given(st.integers(min_value=0, max_value=10**15))
def test_thousands_separators_round_trip(n):
    assert parse_count(f"{n:,}") == n
    assert parse_size(f"{n:,}") == n


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from([("KiB", 2**10), ("MiB", 2**20), ("GB", 10**9), ("MB", 10**6)]))
def test_units_multiply(n, unit):
    assert parse_size(f"{n}{unit[0]}") == n * unit[1]

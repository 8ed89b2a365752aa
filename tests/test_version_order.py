"""Version order: pre-releases sort before their release, the Debian `~` way and the semver
`-rc` way; the order of a whole release train is checked pairwise."""

from __future__ import annotations

import itertools

import pytest

from abupgrade.image.manifest import compare_versions

# Oldest first; every later entry is newer than every earlier one.
TRAIN = [
    "1.9",
    "2.0~~",
    "2.0~alpha",
    "2.0~rc1~git3",
    "2.0~rc1",
    "2.0~rc2",
    "2.0~rc10",
    "2.0",
    "2.0.1~rc1",
    "2.0.1",
    "2.1-alpha",
    "2.1-alpha.1",
    "2.1-beta",
    "2.1-beta.2",
    "2.1-beta.11",
    "2.1-rc.1",
    "2.1",
    "2.10",
]


@pytest.mark.parametrize(("older", "newer"), list(itertools.combinations(TRAIN, 2)))
def test_release_train_is_in_order(older: str, newer: str) -> None:
    assert compare_versions(older, newer) == -1
    assert compare_versions(newer, older) == 1


@pytest.mark.parametrize(("a", "b"), [("2.0~rc1", "2.0-rc1"), ("2.0", "2.0.0"),
                                      ("2.0~rc1+build5", "2.0~rc1"), ("3", "3.0.0")])
def test_equal_spellings(a: str, b: str) -> None:
    assert compare_versions(a, b) == 0
    assert compare_versions(b, a) == 0


def test_tilde_release_candidate_is_not_newer_than_its_release() -> None:
    """The reported case: apply refused 2.0 over a committed 2.0~rc1 as a downgrade."""
    assert compare_versions("2.0~rc1", "2.0") == -1

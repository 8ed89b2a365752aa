"""bls.py: systemd-boot's reading of Boot Loader Specification entries, rule by rule.

The expected orders below are systemd's own documented ones (string-util-fundamental.c and
its test suite, boot.c); the real loader's choices are checked under OVMF in
tests/test_sdboot_boot.py.
"""

from __future__ import annotations

import pytest

from abupgrade.bootloader.bls import (
    Counter,
    EfiVars,
    Entry,
    LoaderConf,
    choose,
    efi_fnmatch,
    load_entries,
    parse_counter,
    sort_entries,
    strverscmp_improved,
)

# systemd documents this chain, oldest first.
VERSIONS = ["~1", "", "ab", "abb", "abc", "0001", "002", "12", "122", "122.9", "123~rc1", "123",
            "123-a", "123-a.1", "123-a1", "123-a1.1", "123-3", "123-3.1", "123^patch1", "123^1",
            "123.a-1", "123.1-1", "123a-1", "124"]


@pytest.mark.parametrize("i", range(len(VERSIONS) - 1))
def test_versions_order_as_systemd_documents(i: int) -> None:
    older = VERSIONS[i]
    for newer in VERSIONS[i + 1:]:
        assert strverscmp_improved(older, newer) == -1, (older, newer)
        assert strverscmp_improved(newer, older) == 1, (newer, older)
    assert strverscmp_improved(older, older) == 0


@pytest.mark.parametrize(("a", "b", "expected"), [
    ("10", "9", 1),  # numbers by value, not by text
    ("0010", "10", 0),  # leading zeros do not count
    ("123_aa2-67.89", "123aa+2-67.89", 0),  # other characters only separate segments
    ("123.", "123", 1),
    ("12_3", "123", -1),
    ("123~rc1-99.99", "123~rc2-67.89", -1),
    (None, "", 0),
    # entry names with boot counters: the older name of a renamed entry sorts as newer
    ("slot-b+3-0.conf", "slot-b+2-1.conf", 1),
    ("slot-b.conf", "slot-b+2-1.conf", -1),
    ("slot-a.conf", "slot-b.conf", -1),
])
def test_version_corner_cases(a: str | None, b: str, expected: int) -> None:
    assert strverscmp_improved(a, b) == expected


@pytest.mark.parametrize(("pattern", "name", "matches"), [
    ("slot-*", "slot-b+3-0.conf", True),
    ("slot-*", "slot-", True),
    ("slot-*", "other.conf", False),
    ("slot-a", "slot-a.conf", False),  # the whole id must match
    ("s?ot-[ab].conf", "slot-b.conf", True),
    ("slot-[a-c].conf", "slot-d.conf", False),
    ("[]x]", "]", True),
    ("[!a]", "!", True),  # no negation in the loader's sets
    ("\\*", "*", True),
    ("*a*b", "xaxxb", True),
    ("*a*b", "xaxxbc", False),
    ("[ab", "a", False),  # unterminated set
])
def test_glob(pattern: str, name: str, matches: bool) -> None:
    assert efi_fnmatch(pattern, name) is matches


@pytest.mark.parametrize(("name", "counter"), [
    ("slot-b+3-0.conf", Counter("slot-b", 3, 0)),
    ("slot-b+3.conf", Counter("slot-b", 3, 0)),
    ("slot-b+3-0.CONF", Counter("slot-b", 3, 0)),
    ("a+b+1-2.conf", Counter("a+b", 1, 2)),  # the last "+"
    ("slot-b.conf", None),
    ("slot-b+x.conf", None),
    ("slot-b+3-0.conf.abupgrade-new", None),  # the counter must end the name before .conf
    ("slot-b+3-.conf", None),
    ("slot-b+99999999999-0.conf", None),  # beyond INT_MAX
])
def test_counter_in_file_names(name: str, counter: Counter | None) -> None:
    assert parse_counter(name) == counter


def test_counter_bumps_like_the_loader() -> None:
    names = []
    counter = parse_counter("slot-b+2.conf")
    for _ in range(3):
        assert counter is not None
        counter = counter.bumped()
        names.append(counter.name())
    assert names == ["slot-b+1-1.conf", "slot-b+0-2.conf", "slot-b+0-3.conf"]


def test_entry_fields() -> None:
    entry = Entry.parse("x.conf", b"# comment\n  title   \"My OS\"  \r\nsort-key os\nversion 3\n"
                        b"linux \\vmlinuz\ninitrd /a/i1\ninitrd /a/i2\noptions a=1\noptions b=2\n"
                        b"lonely\nversion 4\n\0title ignored after a NUL byte\n")
    assert entry is not None
    assert (entry.title, entry.sort_key, entry.version, entry.linux, entry.initrds,
            entry.options) == ("My OS", "os", "4", "vmlinuz", ("a/i1", "a/i2"), "a=1 b=2")
    assert entry.tries_left == -1 and entry.id == "x.conf"


def test_entries_without_a_kernel_or_for_another_architecture_are_dropped() -> None:
    assert Entry.parse("x.conf", b"title x\noptions a\n") is None
    assert Entry.parse("x.conf", b"linux /k\narchitecture aa64\n") is None
    assert Entry.parse("x.conf", b"linux /k\narchitecture X64\n") is not None


def test_load_keeps_what_the_loader_keeps() -> None:
    files = {
        "a.conf": b"linux /k\n", "B.CONF": b"linux /k\n", "c.conf": b"linux /missing\n",
        "auto-x.conf": b"linux /k\n", ".hidden.conf": b"linux /k\n",
        "d.conf.abupgrade-new": b"linux /k\n", "e.txt": b"linux /k\n",
    }
    kept = load_entries(files, lambda path: path == "k")
    assert sorted(e.name for e in kept) == ["B.CONF", "a.conf"]


def entry(name: str, version: str | None = None, sort_key: str | None = "os") -> Entry:
    text = "linux /k\n" + (f"version {version}\n" if version else "")
    text += f"sort-key {sort_key}\n" if sort_key else ""
    parsed = Entry.parse(name, text.encode())
    assert parsed is not None
    return parsed


def order(*entries: Entry) -> list[str]:
    return [e.name for e in sort_entries(entries)]


def test_spent_entries_sort_last_whatever_their_version() -> None:
    assert order(entry("a+0-3.conf", "9"), entry("b.conf", "1")) == ["b.conf", "a+0-3.conf"]


def test_sort_key_entries_first_then_newest_version_then_name() -> None:
    assert order(entry("z.conf", sort_key=None), entry("a.conf", "1")) == ["a.conf", "z.conf"]
    assert order(entry("a.conf", "10"), entry("b.conf", "9")) == ["a.conf", "b.conf"]
    assert order(entry("a.conf", "1", "x"), entry("b.conf", "9", "y")) == ["a.conf", "b.conf"]
    assert order(entry("a.conf", "1"), entry("b.conf", "1")) == ["b.conf", "a.conf"]
    assert order(entry("a.conf", sort_key=None), entry("b.conf", sort_key=None)) == \
        ["b.conf", "a.conf"]


def test_a_trial_renamed_while_its_old_name_stays_boots_the_old_name() -> None:
    """Both names of one entry (a cut in the loader's own rename): the older name wins,
    and its rename onto the newer one fails - the trial is no longer counted."""
    old, new = entry("slot-b+3-0.conf", "2"), entry("slot-b+2-1.conf", "2")
    assert order(new, old) == ["slot-b+3-0.conf", "slot-b+2-1.conf"]


def chosen(entries: list[Entry], conf: LoaderConf | None = None,
           efivars: EfiVars | None = None) -> str | None:
    found = choose(entries, conf or LoaderConf(), efivars or EfiVars())
    return found.name if found else None


def test_choice_order_of_patterns() -> None:
    entries = [entry("slot-a.conf", "1"), entry("slot-b+0-3.conf", "2"), entry("win.conf", "9")]
    assert chosen(entries) == "win.conf"
    assert chosen(entries, LoaderConf.parse(b"default slot-*\n")) == "slot-a.conf"
    # a pattern picks a spent entry when it matches nothing else
    assert chosen(entries, LoaderConf(default="slot-b*")) == "slot-b+0-3.conf"
    assert chosen(entries, LoaderConf(default="slot-*"), EfiVars(entry_default="win*")) == \
        "win.conf"
    assert chosen(entries, LoaderConf(default="slot-*"),
                  EfiVars(entry_default="win*", entry_oneshot="slot-b+0-3.conf")) == \
        "slot-b+0-3.conf"
    assert chosen(entries, LoaderConf(default="nothing-*")) == "win.conf"
    assert chosen([]) is None


def test_loader_conf() -> None:
    conf = LoaderConf.parse(b"timeout 0\ndefault \"slot-*\"\ndefault @unknown\n")
    assert conf == LoaderConf(default="slot-*", timeout=0)

"""What the commands do: apply, rollback, commit, status, history. Knows no bootloader by name.

`boot-hook` runs on every boot and scripts poll `status`: what only some commands use
(cryptography, image reading and building, HTTP, the slot writer, disk layout) is imported
inside the functions that use it, so those two start about as fast as Python itself.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abupgrade import blockdev
from abupgrade.bootloader import Bootloader, BootloaderKind, BootState, backend_class
from abupgrade.bootloader.base import Arch, Firmware, Platform
from abupgrade.config import RegistryConfig, config_path
from abupgrade.errors import ImageRejected, Interrupted, OperationalError, PolicyRefusal, UsageError
from abupgrade.image.manifest import Manifest, PayloadKind, compare_versions
from abupgrade.interrupt import critical
from abupgrade.model import Slot, SlotState
from abupgrade.progress import Progress
from abupgrade.results import (
    CheckResult,
    DiskMade,
    HookInstalled,
    HookResult,
    Installed,
    KeyPair,
    MarkedBad,
    SlotStatus,
    SlotVersion,
    Status,
    Traffic,
)
from abupgrade.state import Event, EventName, SlotRecord, State, Trial, highest, now
from abupgrade.system import Options, System, open_system

if TYPE_CHECKING:
    from abupgrade.adopt import Adopted, Undone
    from abupgrade.health import Report
    from abupgrade.image.keys import Keyring
    from abupgrade.image.reader import ImageInfo, VerifiedImage
    from abupgrade.oci.push import PushResult

__all__ = ["Options"]

HISTORY_LOOKBACK = 50  # events searched for the last one of a slot


# ------------------------------------------------------------------ keys and images


def keygen(prefix: Path) -> KeyPair:
    from abupgrade.image import keys

    private, public = keys.generate(prefix)
    return KeyPair(private, public, keys.key_id(keys.load_public(public)))


def image_build(*, rootfs: Path, version: str, compatible: str, signing_keys: Sequence[Path],
                output: Path, kernel: Path | None, initrd: Path | None, compression: str,
                force: bool, progress: Progress, warn: Callable[[str], None],
                index: bool = True, security_floor: str | None = None,
                blake3: bool = True) -> ImageInfo:
    from abupgrade.image import build as image_builder
    from abupgrade.image import keys
    from abupgrade.image.reader import inspect
    from abupgrade.source import open_source

    for key in signing_keys:
        keys.load_private(key)  # a public key or garbage fails here, before any warning
        warning = keys.permission_warning(key)
        if warning:
            warn(warning)
    for warning in image_builder.rootfs_warnings(rootfs, compression, index):
        warn(warning)
    image_builder.build(rootfs, version, compatible, signing_keys, output, kernel=kernel,
                        initrd=initrd, compression=compression, index=index, progress=progress,
                        security_floor=security_floor, force=force, blake3=blake3)
    with open_source(str(output)) as stream:
        return inspect(stream, None)


def _keyring(options: Options, pubkeys: Sequence[Path]) -> Keyring:
    from abupgrade.image.keys import Keyring

    if pubkeys:
        return Keyring.from_files(pubkeys)
    if options.config is None and options.disk is None and not config_path(None).exists():
        raise UsageError("no key to check the signature with: no --pubkey given and no "
                         "configuration (with its keyring) on this machine",
                         hint="pass --pubkey FILE, the signer's .pub")
    with open_system(options, readonly=True) as system:
        return system.keyring()


def _registry(options: Options, spec: str) -> RegistryConfig | None:
    """For an `oci://` spec, the configured registry settings (the defaults where no
    configuration is at hand); None for anything else."""
    if not spec.startswith("oci://"):
        return None
    if options.config is None and options.disk is None and not config_path(None).exists():
        return RegistryConfig()
    with open_system(options, readonly=True) as system:
        return system.config.registry


def image_verify(options: Options, spec: str, pubkeys: Sequence[Path],
                 progress: Progress) -> VerifiedImage:
    from abupgrade.image.reader import verify
    from abupgrade.source import open_source

    keyring = _keyring(options, pubkeys)
    with open_source(spec, registry=_registry(options, spec)) as stream:
        return verify(stream, keyring, progress)


def image_inspect(options: Options, spec: str, pubkeys: Sequence[Path]) -> ImageInfo:
    from abupgrade.image.reader import inspect
    from abupgrade.source import open_source

    keyring: Keyring | None = None
    if pubkeys:
        keyring = _keyring(options, pubkeys)
    elif options.config is not None or options.disk is not None:
        keyring = _keyring(options, [])
    with open_source(spec, registry=_registry(options, spec)) as stream:
        return inspect(stream, keyring)


def image_push(image: Path, target: str, *, pubkeys: Sequence[Path], ca_file: Path | None,
               auth_file: Path | None, insecure: bool, progress: Progress) -> PushResult:
    from abupgrade import oci
    from abupgrade.image.keys import Keyring
    from abupgrade.oci.reference import parse_reference

    host = parse_reference(target, need_tag=True).host
    settings = RegistryConfig(insecure=(host,) if insecure else (), ca_file=ca_file,
                              auth_file=auth_file)
    keyring = Keyring.from_files(pubkeys) if pubkeys else None
    return oci.push(image, target, settings=settings, keyring=keyring, progress=progress)


def check(options: Options, reference: str) -> CheckResult:
    """Whether `reference` holds a version newer than the committed one (NothingNewer if not)
    that this machine would install: signed by a trusted key that is not revoked (exit 3),
    for this machine and not below the security floor (exit 4). Only the signed head of the
    image is downloaded."""
    from abupgrade import oci
    from abupgrade.image.reader import ImageReader
    from abupgrade.source import open_source

    with open_system(options, readonly=True) as system:
        boot = system.bootloader.read()
        state = system.store.load()
        committed = state.slots[boot.default].version
        settings = system.config.registry
        oci.check(reference, committed, compatible=system.config.compatible, settings=settings)
        with open_source(reference, registry=settings) as stream:
            manifest = ImageReader(stream, system.keyring()).manifest  # the signature
        if manifest.compatible != system.config.compatible:
            raise PolicyRefusal(f"{reference} holds an image for {manifest.compatible!r}, "
                                f"this machine is {system.config.compatible!r}")
        _above_floor(manifest.version, security_floor(system, state), f"{reference} holds")
        oci.check_newer(reference, manifest.version, committed)
    return CheckResult(reference, manifest.version, committed)


# ------------------------------------------------------------------ state of the machine


def _slot_state(slot: Slot, record: SlotRecord, boot: BootState) -> SlotState:
    if boot.trial == slot and boot.tries_left > 0:
        return SlotState.TRIAL
    if record.state is SlotState.EMPTY:
        return SlotState.EMPTY
    if record.state is SlotState.GOOD and slot in boot.bootable:
        return SlotState.GOOD
    return SlotState.BAD


def _active(system: System, boot: BootState) -> Slot:
    """The slot in use: the booted one, or on a disk serviced offline the committed one."""
    return system.booted if system.booted is not None else boot.default


def status(options: Options) -> Status:
    with open_system(options, readonly=True) as system:
        boot = system.bootloader.read()
        state = system.store.load()
        trial = boot.trial if boot.trial is not None and boot.tries_left > 0 else None
        platform = system.bootloader.platform()
        return Status(
            booted=system.booted,
            next_boot=boot.next_boot,
            trial=trial,
            trial_boots_left=boot.tries_left if trial else None,
            committed=boot.default,
            bootloader=system.bootloader.name,
            firmware=str(platform.firmware),
            secure_boot=platform.secure_boot,
            slots={slot: SlotStatus(device=system.device_text(slot),
                                    state=_slot_state(slot, state.slots[slot], boot),
                                    version=state.slots[slot].version,
                                    installed=state.slots[slot].installed)
                   for slot in Slot},
            notes=(*system.bootloader.notes(), *system.bootloader.problems()),
            security_floor=security_floor(system, state),
            counters=system.bootloader.counters(),
        )


def history(options: Options, limit: int | None) -> list[Event]:
    if limit is not None and limit < 1:
        raise UsageError("-n must be at least 1")
    with open_system(options, readonly=True) as system:
        return system.store.history(limit)


# ------------------------------------------------------------------ apply


def apply(options: Options, spec: str, *, allow_downgrade: bool, dry_run: bool, reboot: bool,
          progress: Progress) -> Installed:
    with open_system(options) as system, system.store.lock():
        system.bootloader.preflight()
        boot = system.bootloader.read()
        state = system.store.load()
        active = _active(system, boot)
        target = active.other
        if boot.trial is not None and boot.tries_left > 0:
            raise PolicyRefusal(
                f"a trial boot of slot {boot.trial} is pending",
                hint=f"reboot to finish it, or cancel it with `abupgrade mark-bad {boot.trial}`")
        result = _install(system, state, spec, target, progress=progress, dry_run=dry_run,
                          allow_downgrade=allow_downgrade, committed=state.slots[active].version)
        if dry_run:
            return result
        tries = system.bootloader.trial_boots()
        system.transition(
            EventName.TRIAL_ARMED, target, result.version,
            f"{tries} boot(s) before falling back to slot {active}",
            bootloader=lambda loader: loader.arm_trial(target, tries),
            state=lambda now_: replace(
                now_.with_slot(target, state=SlotState.TRIAL),
                trial=Trial(slot=target, version=result.version,
                            previous=now_.slots[active].version, armed=now())))
        if reboot:
            system.reboot()
        return replace(result, tries=tries)


def security_floor(system: System, state: State) -> str | None:
    """The machine's security floor: the configured one, or higher where committed images
    raised it (see State.committed)."""
    return highest(system.config.security.min_version, state.security_floor)


def _above_floor(version: str | None, floor: str | None, what: str) -> None:
    """Refuse (exit 4) a version below the security floor; an unknown one too, when there is
    a floor. No flag lets it through: a validly signed image with a known hole stays out."""
    if floor is None or version is not None and compare_versions(version, floor) >= 0:
        return
    raise PolicyRefusal(f"{what} version {version or 'unknown'}, below the security floor {floor}",
                        hint=f"nothing older than {floor} is installed or booted, not even with "
                             f"--allow-downgrade; use version {floor} or newer")


def check_policy(manifest: Manifest, target: Slot, *, compatible: str, committed: str | None,
                 allow_downgrade: bool, room: int, bootloader: type[Bootloader],
                 floor: str | None = None) -> None:
    """Refuse (PolicyRefusal, exit 4) an image this machine must not install into `target`
    (a slot of `room` bytes): another machine's, below the security `floor` (whatever the
    flags), older than the `committed` version unless allowed, too large, or without the boot
    files the bootloader boots. Reads nothing."""
    if manifest.compatible != compatible:
        raise PolicyRefusal(f"image is for {manifest.compatible!r}, this machine is {compatible!r}",
                            hint="use an image built for this machine")
    _above_floor(manifest.version, floor, "image has")
    if (committed is not None and not allow_downgrade
            and compare_versions(manifest.version, committed) < 0):
        raise PolicyRefusal(f"image version {manifest.version} is older than the committed "
                            f"{committed}", hint="pass --allow-downgrade if you mean it")
    blockdev.require_fits(manifest.slot.size, room, f"slot {target}")
    for name in bootloader.requires_boot_files:
        if manifest.boot(name) is None:
            raise PolicyRefusal(
                f"{bootloader.name} boots only what is on the boot partition, and "
                f"this image has no {name}", hint=f"build the image with --{name}")


def _install(system: System, state: State, spec: str, target: Slot, *, progress: Progress,
             dry_run: bool, allow_downgrade: bool, committed: str | None,
             delta: bool = True) -> Installed:
    """Verify the image and write it into `target`, which is left unbootable until armed.

    Where the image has a chunk index and its source can be read in parts, only what the
    machine lacks is fetched and only what differs is written (`_install_delta`); otherwise,
    or when that path gives up, the image is streamed whole."""
    from abupgrade.image.reader import ImageReader
    from abupgrade.source import open_source, source_is_remote
    from abupgrade.writer import SlotWriter

    device = system.device(target)
    if not system.offline and system.booted == target:
        raise PolicyRefusal(f"slot {target} is the booted slot", hint="abupgrade never writes it")
    if system.is_in_use(device):
        raise PolicyRefusal(f"slot {target} ({device}) is mounted",
                            hint=f"unmount {device} first")
    started = time.monotonic()

    def policy(manifest: Manifest) -> None:
        check_policy(manifest, target, compatible=system.config.compatible, committed=committed,
                     allow_downgrade=allow_downgrade, room=blockdev.capacity(device),
                     bootloader=type(system.bootloader), floor=security_floor(system, state))

    update = "full"
    downloaded = 0
    if delta and not dry_run and _local_without_index(spec):
        update = "full: the image has no chunk index"
    elif delta and not dry_run:
        outcome = _install_delta(system, state, spec, target, policy, progress)
        if isinstance(outcome, Installed):
            return replace(outcome, seconds=round(time.monotonic() - started, 3))
        update, downloaded = outcome
    with open_source(spec, registry=system.config.registry) as stream:
        # The signature is checked here; a dry run reports the reading as its progress.
        reader = ImageReader(stream, system.keyring(), progress=progress if dry_run else None)
        manifest = reader.manifest
        policy(manifest)
        if dry_run:
            reader.verify()
            return Installed(target, manifest.version, manifest.compatible, 0, dry_run=True)
        _make_unbootable(system, state, target)
        with _recorded(system, target, manifest.version):
            stats = None
            for payload, chunks in reader.payloads():
                if payload.kind is PayloadKind.SLOT:
                    with SlotWriter(device, progress) as writer:
                        stats = writer.write_payload(payload.size, payload.sha256, chunks)
                else:
                    _write_boot_file(system.bootloader, target, payload.name, chunks,
                                     payload.size, progress)
            system.bootloader.check_boot_files(target)
        assert stats is not None
        _installed(system, target, manifest, device)
        if source_is_remote(spec):
            downloaded += reader.offset
    traffic = Traffic(downloaded, stats.written, 0, 0, update)
    return Installed(target, manifest.version, manifest.compatible,
                     stats.written + _boot_bytes(manifest), dry_run=False,
                     seconds=round(time.monotonic() - started, 3), traffic=traffic)


def _local_without_index(spec: str) -> bool:
    """Whether `spec` is an image file here whose manifest lists no chunk index: the delta
    path then has nothing to do, and its modules (HTTP, registries) need not load. The
    manifest is read unverified: it only picks the path, and the streaming path verifies
    everything; anything unexpected leaves the choice to the delta path, as before."""
    import os
    import stat

    from abupgrade.errors import AbupgradeError
    from abupgrade.image.reader import inspect
    from abupgrade.source import source_is_remote

    if source_is_remote(spec):
        return False
    try:
        if not stat.S_ISREG(os.stat(spec).st_mode):
            return False  # a pipe is read once, by the streaming path
        with open(spec, "rb") as f:
            return inspect(f, None).manifest.index is None
    except (OSError, AbupgradeError):
        return False


def _install_delta(system: System, state: State, spec: str, target: Slot,
                   policy: Callable[[Manifest], None], progress: Progress
                   ) -> Installed | tuple[str, int]:
    """The install of an image with a chunk index from a source read in parts; else why not
    (for `update`) and the bytes that cost. Policy refusals and rejected images are raised as
    they would be by the streaming path."""
    from abupgrade.delta.assemble import DeltaFailed
    from abupgrade.delta.blocks import BlockCache
    from abupgrade.delta.image import IndexedImage
    from abupgrade.delta.install import BLOCKS_FOLDER, Delta, SlotSource, open_ranges
    from abupgrade.delta.plan import Source
    from abupgrade.delta.remote import RangesUnsupported
    from abupgrade.writer import SlotWriter

    ranges = open_ranges(spec, system.config.registry)
    if ranges is None:
        return "full: the image's source cannot be read in parts", 0
    with contextlib.closing(ranges):
        try:
            # the signature is checked here, then the policy, then the members
            image = IndexedImage(ranges, system.keyring(), policy)
            manifest = image.manifest
            if image.index is None:
                return "full: the image has no chunk index", ranges.received
            device, active = system.device(target), target.other
            delta = Delta(image, BlockCache(system.config.state_dir / BLOCKS_FOLDER),
                          target=SlotSource(device, state.slots[target].sha256,
                                            read_unknown=_stopped_midway(system, target)),
                          active=SlotSource(system.device(active), state.slots[active].sha256))
            plan = delta.plan(progress)
        except RangesUnsupported as exc:
            return f"full: {exc.message}", ranges.received
        progress.start(f"delta: {_mib(plan.fetch_bytes)} to fetch, "
                       f"{_mib(plan.bytes_from(Source.ACTIVE))} from slot {active}, "
                       f"{_mib(plan.bytes_from(Source.IN_PLACE))} in place", 0)
        progress.finish()
        _make_unbootable(system, state, target)
        with _recorded(system, target, manifest.version):
            try:
                with SlotWriter(device, progress) as writer:  # writes only what differs
                    stats = writer.write_payload(manifest.slot.size, manifest.slot.sha256,
                                                 delta.pieces(plan), compare=True)
            except (DeltaFailed, RangesUnsupported) as exc:
                delta.forget_stale()
                system.store.record(EventName.DELTA_FALLBACK, target, manifest.version,
                                    f"{exc.message}; applying the whole image")
                return f"full: {exc.message}", ranges.received
            for payload in manifest.payloads:
                if payload.kind is PayloadKind.BOOT:
                    _write_boot_file(system.bootloader, target, payload.name,
                                     image.boot_payload(payload.name), payload.size, progress)
            system.bootloader.check_boot_files(target)
        delta.done()
        _installed(system, target, manifest, device)
        traffic = Traffic(ranges.received, stats.written, stats.reused,
                          delta.assembler.tally.from_active, "delta")
    return Installed(target, manifest.version, manifest.compatible,
                     stats.written + _boot_bytes(manifest), dry_run=False, traffic=traffic)


def _stopped_midway(system: System, slot: Slot) -> bool:
    """Whether the last install into `slot` stopped before its end (what it wrote may serve)."""
    for event in reversed(system.store.history(HISTORY_LOOKBACK)):
        if event.slot == slot:
            return event.event in (EventName.INTERRUPTED, EventName.INSTALL_FAILED,
                                   EventName.DELTA_FALLBACK)
    return False


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _boot_bytes(manifest: Manifest) -> int:
    return sum(p.size for p in manifest.payloads if p.kind is PayloadKind.BOOT)


def _installed(system: System, target: Slot, manifest: Manifest, device: Path) -> None:
    system.transition(
        EventName.INSTALLED, target, manifest.version,
        f"{manifest.slot.size:,} bytes to {device}, read back and verified",
        state=lambda now_: now_.with_slot(target, state=SlotState.BAD,
                                          version=manifest.version, installed=now(),
                                          sha256=manifest.slot.sha256,
                                          security_floor=manifest.security_floor))


def _make_unbootable(system: System, state: State, target: Slot) -> None:
    """The point of no return for `target`: unbootable, empty in state.json and without boot
    files before its first byte changes."""
    bootable = system.bootloader.read().bootable
    if target in bootable and target.other not in bootable:
        if state.slots[target].state is not SlotState.EMPTY:
            raise PolicyRefusal(f"slot {target} is the only bootable slot",
                                hint="writing it would leave nothing to boot")
        # a fresh disk: nothing is installed anywhere, there is nothing to protect
    with critical():
        if target in bootable and target.other in bootable:
            system.bootloader.disable(target)
        system.store.save(replace(state.with_slot(target, state=SlotState.EMPTY, version=None,
                                                  installed=None, sha256=None,
                                                  security_floor=None),
                                  trial=None))
        _drop_boot_files(system, target)


@contextlib.contextmanager
def _recorded(system: System, target: Slot, version: str) -> Iterator[None]:
    """Writing the payloads: a failure leaves no boot file behind and is in the history."""
    try:
        yield
    except (Interrupted, KeyboardInterrupt) as exc:
        _drop_boot_files(system, target)
        system.store.record(EventName.INTERRUPTED, target, version,
                            f"writing slot {target} stopped: {exc or 'interrupted'}; "
                            "the slot stays unbootable")
        raise
    except (ImageRejected, OperationalError, PolicyRefusal) as exc:
        _drop_boot_files(system, target)
        system.store.record(EventName.INSTALL_FAILED, target, version,
                            f"{exc.message}; the slot stays unbootable")
        raise


def _drop_boot_files(system: System, target: Slot) -> None:
    """Remove the target's kernel and initrd: none is left behind by an install that failed."""
    system.bootloader.drop_boot_files(target)


def _write_boot_file(loader: Bootloader, slot: Slot, name: str, chunks: Iterator[Any],
                     size: int, progress: Progress) -> None:
    progress.start(loader.boot_file_path(slot, name).name, size)
    try:
        with loader.boot_file_writer(slot, name) as out:
            for chunk in chunks:  # raises ImageRejected at the end on a hash mismatch
                out.write(chunk)
                progress.advance(len(chunk))
    finally:
        progress.finish()


# ------------------------------------------------------------------ commit, rollback, mark


def mark_good(options: Options) -> SlotVersion:
    with open_system(options) as system, system.store.lock():
        slot = system.booted
        if slot is None:
            raise UsageError("there is no booted slot to commit",
                             hint="with --disk nothing is booted; boot the slot to commit it")
        return _commit(system, slot, "marked good by hand")


def _commit(system: System, slot: Slot, detail: str) -> SlotVersion:
    state = system.store.load()
    version = state.slots[slot].version
    system.transition(
        EventName.COMMITTED, slot, version, detail,
        bootloader=lambda loader: loader.commit(slot),
        state=lambda now_: replace(now_.committed(slot), trial=_trial_without(now_, slot)))
    system.store.record_floor(state, slot)
    return SlotVersion(slot, version)


def _trial_without(state: State, slot: Slot) -> Trial | None:
    """The state's trial, unless it is one of `slot`."""
    return state.trial if state.trial is not None and state.trial.slot != slot else None


def mark_bad(options: Options, slot: Slot | None) -> MarkedBad:
    with open_system(options) as system, system.store.lock():
        boot = system.bootloader.read()
        slot = slot or system.booted
        if slot is None:
            raise UsageError("which slot? nothing is booted", hint="name the slot: mark-bad A")
        state = system.store.load()
        other = slot.other
        other_ok = (other in boot.bootable and state.slots[other].state is SlotState.GOOD)
        if slot == boot.default and not other_ok:
            raise PolicyRefusal(f"slot {slot} is the only good slot",
                                hint="marking it bad would leave nothing to boot")
        if slot == boot.default:
            _above_floor(state.slots[other].version, security_floor(system, state),
                         f"marking slot {slot} bad would boot slot {other},")
        bad = slot
        system.transition(
            EventName.MARKED_BAD, bad, state.slots[bad].version, "marked bad by hand",
            bootloader=lambda loader: loader.disable(bad),
            state=lambda now_: replace(now_.with_slot(bad, state=SlotState.BAD),
                                       trial=_trial_without(now_, bad)))
        return MarkedBad(bad, system.bootloader.read().next_boot)


def rollback(options: Options, *, reboot: bool) -> SlotVersion:
    with open_system(options) as system, system.store.lock():
        boot = system.bootloader.read()
        state = system.store.load()
        active = _active(system, boot)
        target = active.other
        if _slot_state(target, state.slots[target], boot) is not SlotState.GOOD:
            raise PolicyRefusal(
                f"slot {target} holds no good image "
                f"({_slot_state(target, state.slots[target], boot)})",
                hint="rollback goes only to a slot that booted healthy before")
        _above_floor(state.slots[target].version, security_floor(system, state),
                     f"slot {target} holds")
        # A trial running on the active slot ends with it: it is not going to be committed.
        abandoned = state.trial is not None and state.trial.slot == active

        def switch(loader: Bootloader) -> None:
            if abandoned:
                loader.disable(active)
            loader.commit(target)

        def update(now_: State) -> State:
            if abandoned:
                now_ = now_.with_slot(active, state=SlotState.BAD)
            return replace(now_, trial=None)

        version = state.slots[target].version
        system.transition(EventName.MANUAL_ROLLBACK, target, version,
                          f"by hand, from slot {active}", bootloader=switch, state=update)
        if reboot:
            system.reboot()
        return SlotVersion(target, version)


# ------------------------------------------------------------------ disks


def platform_for(kind: BootloaderKind, *, firmware: Firmware | None, arch: Arch | None,
                 secure_boot: bool) -> Platform:
    """What `disk init` lays a disk out for: the backend's own firmware unless one is
    given (Secure Boot is UEFI's), amd64 unless an arch is given. Whether the backend
    boots it, its `plan` says."""
    if secure_boot and firmware is Firmware.BIOS:
        raise UsageError("--secure-boot needs --firmware uefi",
                         hint="Secure Boot is a feature of UEFI firmware")
    own = backend_class(kind).platforms[0].firmware
    chosen = firmware or (Firmware.UEFI if secure_boot else own)
    return Platform(chosen, arch or Arch.AMD64, secure_boot)


def disk_init(target: Path, kind: BootloaderKind, *, size: int | None, slot_size: int,
              image: str | None, pubkeys: Sequence[Path], compatible: str | None, force: bool,
              progress: Progress, platform: Platform | None = None) -> DiskMade:
    from abupgrade import diskinit
    from abupgrade.image.reader import inspect
    from abupgrade.source import open_source

    if compatible is None:
        if image is None:
            raise UsageError("disk init needs --compatible or an --image to take it from")
        with open_source(image) as stream:
            compatible = inspect(stream, None).manifest.compatible
    if image is not None and not pubkeys:
        raise UsageError("--image needs --pubkey: the disk's keyring must trust its signer")
    made = diskinit.init_disk(target, kind, size=size, slot_size=slot_size, force=force,
                              pubkeys=pubkeys, compatible=compatible, platform=platform)
    version = None
    if image is not None:
        with open_system(Options(disk=target)) as system, system.store.lock():
            # a fresh disk holds nothing a delta could reuse
            installed = _install(system, system.store.load(), image, Slot.A, progress=progress,
                                 dry_run=False, allow_downgrade=True, committed=None, delta=False)
            _commit(system, Slot.A, "first image, installed by disk init")
        version = installed.version
    return DiskMade(target, str(kind), made.slot_size, compatible, version)


# ------------------------------------------------------------------ boot hook and health


def install_hook(init: str | None, root: Path, *, force: bool) -> HookInstalled:
    from abupgrade import integrations

    kind = init or integrations.detect(root)
    written = integrations.install(kind, root, force=force)
    return HookInstalled(kind, root, tuple(written))


def boot_hook(options: Options, *, reboot: bool) -> HookResult:
    from abupgrade import hook

    with open_system(options, mount=True) as system, system.store.lock():
        return hook.boot(system, reboot=reboot)


def health(options: Options) -> Report:
    from abupgrade import hook

    with open_system(options, readonly=True) as system:
        return hook.check_now(system)


# ------------------------------------------------------------------ existing machines


def adopt(*, compatible: str, pubkeys: Sequence[Path], version: str | None, other: str | None,
          state_dir: Path | None, kernel: Path | None, initrd: Path | None,
          cmdline: str | None, tries: int, init: str | None, hook: bool,
          dry_run: bool) -> Adopted:
    """Bring this running GRUB machine under abupgrade (adopt.py)."""
    from abupgrade import adopt as adoption

    running = adoption.Running()
    layout = adoption.inspect_machine(running, other=other, state_dir=state_dir, kernel=kernel,
                                      initrd=initrd, cmdline=cmdline)
    return adoption.adopt(running, layout, compatible=compatible, pubkeys=pubkeys,
                          version=version, tries=tries, init=init, hook=hook, dry_run=dry_run)


def adopt_undo(options: Options) -> Undone:
    """Take this machine out from under abupgrade again (adopt.py)."""
    from abupgrade import adopt as adoption

    with open_system(options) as system, system.store.lock():
        if system.offline:
            raise UsageError("adopt --undo works on the running machine, not with --disk")
        boot = system.bootloader.read()
        pending = boot.trial is not None and boot.tries_left > 0
        return adoption.undo(adoption.Running(), system.booted, trial_pending=pending)

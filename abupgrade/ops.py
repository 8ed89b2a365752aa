"""What the commands do: apply, rollback, commit, status, history. Knows no bootloader by name."""

from __future__ import annotations

import fcntl
import os
import struct
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from abupgrade import diskinit, fsutil, run
from abupgrade.bootloader import BootState
from abupgrade.config import RegistryConfig, config_path
from abupgrade.errors import (
    ImageRejected,
    Interrupted,
    OperationalError,
    PolicyRefusal,
    UsageError,
)
from abupgrade.image import build as image_builder
from abupgrade.image import keys
from abupgrade.image.manifest import PayloadKind, compare_versions
from abupgrade.image.reader import ImageReader, inspect, verify
from abupgrade.interrupt import critical
from abupgrade.model import BootloaderKind, Slot, SlotState
from abupgrade.progress import Progress
from abupgrade.source import open_source
from abupgrade.state import SlotRecord, State, Trial, now
from abupgrade.system import Options, System, open_system
from abupgrade.writer import SlotWriter

__all__ = ["Options"]

_BLKGETSIZE64 = 0x80081272


# ------------------------------------------------------------------ keys and images


def keygen(prefix: Path) -> tuple[Path, Path, str]:
    private, public = keys.generate(prefix)
    return private, public, keys.key_id(keys.load_public(public))


def image_build(*, rootfs: Path, version: str, compatible: str, signing_keys: Sequence[Path],
                output: Path, kernel: Path | None, initrd: Path | None, compression: str,
                progress: Progress) -> dict[str, Any]:
    for key in signing_keys:
        warning = keys.permission_warning(key)
        if warning:
            print(f"abupgrade: warning: {warning}", file=sys.stderr)
    image_builder.build(rootfs, version, compatible, signing_keys, output, kernel=kernel,
                        initrd=initrd, compression=compression, progress=progress)
    with open_source(str(output)) as stream:
        return inspect(stream, None).to_json()


def _keyring(options: Options, pubkeys: Sequence[Path]) -> keys.Keyring:
    if pubkeys:
        return keys.Keyring.from_files(pubkeys)
    with open_system(options, readonly=True) as system:
        return system.keyring()


def _registry(options: Options) -> RegistryConfig:
    """The configured registry settings, or the defaults where no configuration is at hand."""
    if options.config is None and options.disk is None and not config_path(None).exists():
        return RegistryConfig()
    with open_system(options, readonly=True) as system:
        return system.config.registry


def image_verify(options: Options, spec: str, pubkeys: Sequence[Path],
                 progress: Progress) -> dict[str, Any]:
    keyring = _keyring(options, pubkeys)
    with open_source(spec, registry=_registry(options) if spec.startswith("oci://") else None) as stream:
        verified = verify(stream, keyring, progress)
    return {
        "version": verified.manifest.version,
        "compatible": verified.manifest.compatible,
        "payloads": [p.to_json() for p in verified.manifest.payloads],
        "signatures": [s.to_json() for s in verified.signatures],
    }


def image_inspect(options: Options, spec: str, pubkeys: Sequence[Path]) -> dict[str, Any]:
    keyring: keys.Keyring | None = None
    if pubkeys:
        keyring = keys.Keyring.from_files(pubkeys)
    elif options.config is not None or options.disk is not None:
        keyring = _keyring(options, [])
    registry = _registry(options) if spec.startswith("oci://") else None
    with open_source(spec, registry=registry) as stream:
        return inspect(stream, keyring).to_json()


def image_push(image: Path, target: str, *, pubkeys: Sequence[Path], ca_file: Path | None,
               auth_file: Path | None, insecure: bool, progress: Progress) -> dict[str, Any]:
    from abupgrade import oci
    from abupgrade.oci.reference import parse_reference

    host = parse_reference(target, need_tag=True).host
    settings = RegistryConfig(insecure=(host,) if insecure else (), ca_file=ca_file,
                              auth_file=auth_file)
    keyring = keys.Keyring.from_files(pubkeys) if pubkeys else None
    return oci.push(image, target, settings=settings, keyring=keyring, progress=progress).to_json()


def check(options: Options, reference: str) -> dict[str, Any]:
    """Whether `reference` holds a version newer than the committed one (NothingNewer if not)."""
    from abupgrade import oci

    with open_system(options, readonly=True) as system:
        boot = system.bootloader.read()
        committed = system.store.load().slots[boot.default].version
        version = oci.check(reference, committed, compatible=system.config.compatible,
                            settings=system.config.registry)
    return {"reference": reference, "version": version, "committed": committed}


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


def status(options: Options) -> dict[str, Any]:
    with open_system(options, readonly=True) as system:
        boot = system.bootloader.read()
        state = system.store.load()
        notes = []
        if system.bootloader.max_tries is not None:
            notes.append(f"{system.bootloader.name} gives a trial exactly "
                         f"{system.bootloader.max_tries} boot(s) before it falls back")
        notes += system.bootloader.problems()
        trial = boot.trial if boot.trial is not None and boot.tries_left > 0 else None
        return {
            "booted": str(system.booted) if system.booted else None,
            "next_boot": str(boot.next_boot),
            "trial": str(trial) if trial else None,
            "trial_boots_left": boot.tries_left if trial else 0,
            "committed": str(boot.default),
            "bootloader": system.bootloader.name,
            "slots": {
                str(slot): {
                    "device": system.device_text(slot),
                    "state": str(_slot_state(slot, state.slots[slot], boot)),
                    "version": state.slots[slot].version,
                    "installed": state.slots[slot].installed,
                }
                for slot in Slot
            },
            "notes": notes,
        }


def history(options: Options, limit: int | None) -> list[dict[str, Any]]:
    if limit is not None and limit < 1:
        raise UsageError("-n must be at least 1")
    with open_system(options, readonly=True) as system:
        return [e.to_json() for e in system.store.history(limit)]


# ------------------------------------------------------------------ apply


def _capacity(device: Path) -> int:
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size: int = struct.unpack("=Q", fcntl.ioctl(fd, _BLKGETSIZE64, b"\0" * 8))[0]
        return size
    except OSError:
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def _reboot(system: System) -> None:
    if system.offline:
        raise UsageError("--reboot makes no sense with --disk")
    run.run(system.config.system.reboot, timeout=60)


def apply(options: Options, spec: str, *, allow_downgrade: bool, dry_run: bool, reboot: bool,
          progress: Progress) -> dict[str, Any]:
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
        tries = system.config.grub.tries
        if system.bootloader.max_tries is not None:
            tries = min(tries, system.bootloader.max_tries)
        with critical():
            system.bootloader.arm_trial(target, tries)
            state = system.store.load()
            system.store.save(replace(
                state.with_slot(target, state=SlotState.TRIAL),
                trial=Trial(slot=target, version=result["version"],
                            previous=state.slots[active].version, armed=now()),
            ))
            system.store.record("trial-armed", target, result["version"],
                                f"{tries} boot(s) before falling back to slot {active}")
        result["tries"] = tries
        if reboot:
            _reboot(system)
        return result


def _install(system: System, state: State, spec: str, target: Slot, *, progress: Progress,
             dry_run: bool, allow_downgrade: bool, committed: str | None) -> dict[str, Any]:
    """Verify the image and write it into `target`, which is left unbootable until armed."""
    device = system.device(target)
    if not system.offline and system.booted == target:
        raise PolicyRefusal(f"slot {target} is the booted slot", hint="abupgrade never writes it")
    if system.is_in_use(device):
        raise PolicyRefusal(f"slot {target} ({device}) is mounted",
                            hint=f"unmount {device} first")
    started = time.monotonic()
    with open_source(spec, registry=system.config.registry) as stream:
        reader = ImageReader(stream, system.keyring())  # the signature is checked here
        manifest = reader.manifest
        if manifest.compatible != system.config.compatible:
            raise PolicyRefusal(
                f"image is for {manifest.compatible!r}, this machine is "
                f"{system.config.compatible!r}", hint="use an image built for this machine")
        if (committed is not None and not allow_downgrade
                and compare_versions(manifest.version, committed) < 0):
            raise PolicyRefusal(f"image version {manifest.version} is older than the committed "
                                f"{committed}", hint="pass --allow-downgrade if you mean it")
        capacity = _capacity(device)
        if manifest.slot.size > capacity:
            raise PolicyRefusal(
                f"image's root filesystem ({manifest.slot.size:,} bytes) is larger than slot "
                f"{target} ({capacity:,} bytes)", hint="build the image for this disk's slot size")
        for name in system.bootloader.requires_boot_files:
            if manifest.boot(name) is None:
                raise PolicyRefusal(
                    f"{system.bootloader.name} boots only what is on the boot partition, and "
                    f"this image has no {name}", hint=f"build the image with --{name}")
        result: dict[str, Any] = {"slot": str(target), "version": manifest.version,
                                  "compatible": manifest.compatible, "written": 0,
                                  "dry_run": dry_run}
        if dry_run:
            verify_progress = progress
            verify_progress.start("verify", sum(p.size for p in manifest.payloads))
            try:
                for _payload, chunks in reader.payloads():
                    for chunk in chunks:
                        verify_progress.advance(len(chunk))
            finally:
                verify_progress.finish()
            return result

        # The point of no return for the target: unbootable before its first byte changes.
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
                                                      installed=None, sha256=None),
                                      trial=None))
            _drop_boot_files(system, target)
        try:
            for payload, chunks in reader.payloads():
                if payload.kind is PayloadKind.SLOT:
                    with SlotWriter(device, progress) as writer:
                        stats = writer.write_payload(payload.size, payload.sha256, chunks)
                    result["written"] += stats.written
                else:
                    _write_boot_file(system.bootloader.boot_file_path(target, payload.name),
                                     chunks, payload.size, progress)
                    result["written"] += payload.size
        except (Interrupted, KeyboardInterrupt) as exc:
            _drop_boot_files(system, target)
            system.store.record("interrupted", target, manifest.version,
                                f"writing slot {target} stopped: {exc or 'interrupted'}; "
                                "the slot stays unbootable")
            raise
        except (ImageRejected, OperationalError, PolicyRefusal) as exc:
            _drop_boot_files(system, target)
            system.store.record("install-failed", target, manifest.version,
                                f"{exc.message}; the slot stays unbootable")
            raise
        with critical():
            state = system.store.load()
            system.store.save(state.with_slot(target, state=SlotState.BAD,
                                              version=manifest.version, installed=now(),
                                              sha256=manifest.slot.sha256))
            system.store.record("installed", target, manifest.version,
                                f"{manifest.slot.size:,} bytes to {device}, read back and verified")
    result["seconds"] = round(time.monotonic() - started, 3)
    return result


def _drop_boot_files(system: System, target: Slot) -> None:
    """Remove the target's kernel and initrd: none is left behind by an install that failed."""
    for name in ("kernel", "initrd"):
        fsutil.remove(system.bootloader.boot_file_path(target, name), boot=True)


def _write_boot_file(path: Path, chunks: Iterator[Any], size: int, progress: Progress) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    progress.start(path.name, size)
    try:
        with fsutil.atomic_writer(path, boot=True) as out:
            for chunk in chunks:  # raises ImageRejected at the end on a hash mismatch
                out.write(chunk)
                progress.advance(len(chunk))
    finally:
        progress.finish()


# ------------------------------------------------------------------ commit, rollback, mark


def mark_good(options: Options) -> dict[str, Any]:
    with open_system(options) as system, system.store.lock():
        slot = system.booted
        if slot is None:
            raise UsageError("there is no booted slot to commit",
                             hint="with --disk nothing is booted; boot the slot to commit it")
        return _commit(system, slot, "committed", "marked good by hand")


def _commit(system: System, slot: Slot, event: str, detail: str) -> dict[str, Any]:
    with critical():
        system.bootloader.commit(slot)
        state = system.store.load()
        trial = state.trial if state.trial is not None and state.trial.slot != slot else None
        version = state.slots[slot].version
        system.store.save(replace(state.with_slot(slot, state=SlotState.GOOD), trial=trial))
        system.store.record(event, slot, version, detail)
    return {"slot": str(slot), "version": version}


def mark_bad(options: Options, slot: Slot | None) -> dict[str, Any]:
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
        with critical():
            system.bootloader.disable(slot)
            trial = state.trial if state.trial is not None and state.trial.slot != slot else None
            system.store.save(replace(state.with_slot(slot, state=SlotState.BAD), trial=trial))
            system.store.record("marked-bad", slot, state.slots[slot].version, "marked bad by hand")
        return {"slot": str(slot), "next_boot": str(system.bootloader.read().next_boot)}


def rollback(options: Options, *, reboot: bool) -> dict[str, Any]:
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
        with critical():
            if state.trial is not None and state.trial.slot == active:
                system.bootloader.disable(active)
                state = state.with_slot(active, state=SlotState.BAD)
            system.bootloader.commit(target)
            system.store.save(replace(state, trial=None))
            system.store.record("manual-rollback", target, state.slots[target].version,
                                f"by hand, from slot {active}")
        result = {"slot": str(target), "version": state.slots[target].version}
        if reboot:
            _reboot(system)
        return result


# ------------------------------------------------------------------ disks


def disk_init(target: Path, kind: BootloaderKind, *, size: int | None, slot_size: int,
              image: str | None, pubkeys: Sequence[Path], compatible: str | None, force: bool,
              progress: Progress) -> dict[str, Any]:
    if compatible is None:
        if image is None:
            raise UsageError("disk init needs --compatible or an --image to take it from")
        with open_source(image) as stream:
            compatible = inspect(stream, None).manifest.compatible
    if image is not None and not pubkeys:
        raise UsageError("--image needs --pubkey: the disk's keyring must trust its signer")
    made = diskinit.init_disk(target, kind, size=size, slot_size=slot_size, force=force,
                              pubkeys=pubkeys, compatible=compatible)
    result: dict[str, Any] = {"target": str(target), "bootloader": str(kind),
                              "slot_size": made.slot_size, "compatible": compatible,
                              "version": None}
    if image is not None:
        with open_system(Options(disk=target)) as system, system.store.lock():
            installed = _install(system, system.store.load(), image, Slot.A, progress=progress,
                                 dry_run=False, allow_downgrade=True, committed=None)
            _commit(system, Slot.A, "committed", "first image, installed by disk init")
        result["version"] = installed["version"]
    return result


# ------------------------------------------------------------------ boot hook and health


def install_hook(init: str | None, root: Path, *, force: bool) -> dict[str, Any]:
    from abupgrade import integrations

    kind = init or integrations.detect(root)
    written = integrations.install(kind, root, force=force)
    return {"init": kind, "root": str(root), "written": [str(p) for p in written]}


def boot_hook(options: Options, *, reboot: bool) -> dict[str, Any]:
    from abupgrade import hook

    with open_system(options) as system, system.store.lock():
        return hook.boot(system, reboot=reboot)


def health(options: Options) -> dict[str, Any]:
    from abupgrade import hook

    with open_system(options, readonly=True) as system:
        return hook.check_now(system)


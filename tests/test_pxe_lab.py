"""The PXE lab (tests/pxelab.py) boots a VM for real: the hand-validated proxy
dnsmasq, hand-written TFTP files, QEMU's iPXE (BIOS, TCG). One computer is
switched from automation to production by rewriting its per-MAC script, as
the PXE process will. Fails, never skips, where QEMU, dnsmasq, iPXE, busybox
or a kernel is missing (the error names the Debian package)."""

from __future__ import annotations

import secrets
import shutil

import pxelab

MAC = "52:54:00:12:34:56"
VERSION = "20261207T120000"


def test_a_vm_boots_automation_then_production(tmp_path):
    pxelab.need_all()
    with pxelab.Lab(tmp_path) as lab:
        lab.site_dhcp()
        root, run = lab.public_dir("root"), lab.public_dir("run")
        pxe = root / "dsagent-pxe"
        pxe.mkdir(mode=0o755)
        shutil.copy(pxelab.ipxe_file("undionly.kpxe"), pxe)
        (pxe / "boot.ipxe").write_text(
            "#!ipxe\nchain ${mac:hexhyp}.ipxe || chain unknown.ipxe || exit\n")
        per_mac = pxe / (MAC.replace(":", "-") + ".ipxe")
        per_mac.write_text("#!ipxe\nchain /auto64/current/boot.ipxe\n")
        version = root / "auto64" / VERSION
        version.mkdir(parents=True, mode=0o755)
        shutil.copy(pxelab.kernel(), version / "vmlinuz")
        shown = tmp_path / "shown.txt"
        shown.write_text(f"content {secrets.token_hex(8)}\n")
        pxelab.build_initrd(version, shown)
        (version / "boot.ipxe").write_text(
            f"#!ipxe\nkernel /auto64/{VERSION}/vmlinuz {pxelab.KERNEL_ARGS}\n"
            f"initrd /auto64/{VERSION}/initrd.img\nboot\n")
        (root / "auto64" / "current").symlink_to(VERSION)
        (run / "hosts").write_text(MAC + "\n")
        (run / "opts").write_text("")
        proxy = lab.proxy(root, run)

        automation = lab.boot(MAC, timeout=45)
        assert automation.done == pxelab.MARKER, automation.serial + proxy.output()
        assert shown.read_text().strip() in automation.serial

        per_mac.write_text("#!ipxe\nexit\n")           # production: boot from the disk
        production = lab.boot(MAC, done=(pxelab.MARKER, pxelab.NO_BOOTABLE_DEVICE), timeout=30)
        assert production.done == pxelab.NO_BOOTABLE_DEVICE, production.serial + proxy.output()
        assert pxelab.MARKER not in production.serial
        assert proxy.alive()
        print(f"automation {automation.seconds:.1f} s, production {production.seconds:.1f} s")

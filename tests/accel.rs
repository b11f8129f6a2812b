//! A KVM that opens and runs a tiny guest but stops OVMF with "KVM
//! internal error" (seen on nested hosts; QEMU then waits forever) must
//! not hang kiln: the probe boots the firmware itself and says no, and a
//! VM started under KVM anyway is restarted under TCG.
//!
//! The failing KVM is imitated by a `qemu-system-x86_64` first on PATH
//! that, given `-accel kvm`, prints QEMU's words and hangs, and otherwise
//! runs the real QEMU. Its own test binary: it changes PATH for the process.

use std::os::unix::fs::PermissionsExt as _;
use std::time::{Duration, Instant};

use kiln::verify::vm::{Accel, Vm, VmConfig, probe};

#[test]
fn a_kvm_that_cannot_run_the_firmware_falls_back_to_tcg() {
    let real = kiln::verify::vm::QEMU
        .find()
        .expect("qemu-system-x86_64 (make setup)");
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("qemu-system-x86_64");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\ncase \" $* \" in *' -accel kvm '*)\n  echo 'KVM internal error. Suberror: 1' >&2\n  echo 'emulation failure' >&2\n  exec sleep 600;;\nesac\nexec {} \"$@\"\n",
            real.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![dir.path().to_path_buf()];
    paths.extend(std::env::split_paths(&path));
    // SAFETY: the only test of this binary; no other thread reads the environment.
    unsafe {
        std::env::set_var("PATH", std::env::join_paths(paths).unwrap());
        std::env::remove_var("KILN_ACCEL");
    }

    // The probe sees the internal error and answers before its deadline.
    let deadline = Duration::from_secs(120);
    let t = Instant::now();
    assert!(!probe(Accel::Kvm, deadline).unwrap());
    assert!(
        t.elapsed() < deadline,
        "the probe waited for its deadline instead of reading QEMU's error"
    );

    // A VM asked to run under KVM is restarted under TCG and boots the firmware.
    let mut cfg = VmConfig::diskless("kvm-fallback");
    cfg.accel = Accel::Kvm;
    cfg.memory_mib = 256;
    let mut vm = Vm::start(&cfg).unwrap();
    assert_eq!(vm.accel, Accel::Tcg);
    vm.wait_serial("BdsDxe", 0, Duration::from_secs(120))
        .unwrap();
    assert!(
        vm.serial_find("KVM internal error", 0).is_none(),
        "the serial log is the TCG run's own"
    );
}

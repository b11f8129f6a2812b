//! The QEMU harness: boot a disk image the real way (OVMF → systemd-boot
//! → kernel), capture the serial console with host timestamps, run
//! commands in the guest over SSH, wait on conditions with timeouts, and
//! always kill QEMU (on drop, so also on panic).
//!
//! Boots run on a qcow2 overlay whose backing file is the image: the image
//! under test is never modified. KVM is used when it works and TCG
//! otherwise ([`detect_accel`]).
//!
//! Why SSH to run commands: the checks need SSH anyway (a profile's user
//! logs in with its key, password login is refused, an allowed port
//! connects from outside), it needs nothing in the image that a user's
//! node would not have, and it gives exit codes and separate stdout and
//! stderr. The serial console is kept for the boot timeline and for
//! diagnosis when a boot fails.

use std::io::{BufRead as _, Write as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::util::cancel::Cancel;
use crate::util::tool::Tool;

pub const QEMU: Tool = Tool::new("qemu-system-x86_64", "qemu-system-x86");
pub use crate::image::disk::QEMU_IMG;
pub const SSH: Tool = Tool::new("ssh", "openssh-client");
/// Options of every SSH connection to a guest: a throwaway host key (a
/// new one per VM), no prompts, quiet, bounded connect time, and a
/// keep-alive that gives up on a guest silent for 30 s.
pub const SSH_OPTIONS: &[&str] = &[
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "LogLevel=ERROR",
    "-o",
    "BatchMode=yes",
    "-o",
    "ConnectTimeout=10",
    "-o",
    "ServerAliveInterval=5",
    "-o",
    "ServerAliveCountMax=6",
];
/// The longest one command in a guest may run (the slowest, a k3s
/// start under TCG, takes well under a minute).
const SSH_COMMAND_DEADLINE: Duration = Duration::from_secs(300);

/// `wait_with_output`, but the child is killed after `deadline`.
fn wait_with_deadline(mut child: Child, deadline: Duration) -> anyhow::Result<Output> {
    fn drain(r: Option<impl std::io::Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    }
    let (out, err) = (drain(child.stdout.take()), drain(child.stderr.take()));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("no answer within {} s: killed", deadline.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}
/// OVMF firmware (Debian's ovmf package), 4 MiB flash layout.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// Guest memory: k3s (the real one) wants at least 1 GiB.
pub const DEFAULT_MEMORY_MIB: u32 = 1536;
/// How often conditions are polled.
const POLL: Duration = Duration::from_millis(250);

/// How QEMU runs the guest's instructions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    fn args(self) -> [&'static str; 4] {
        match self {
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
            Accel::Tcg => ["-accel", "tcg", "-cpu", "max"],
        }
    }
}

/// `KILN_ACCEL=kvm|tcg`, if set: the user's choice, never second-guessed.
fn forced_accel() -> Option<Accel> {
    match std::env::var("KILN_ACCEL").as_deref() {
        Ok("kvm") => Some(Accel::Kvm),
        Ok("tcg") => Some(Accel::Tcg),
        _ => None,
    }
}

/// Set once a guest under KVM failed: every later VM of this process
/// uses TCG.
static KVM_BROKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// How long OVMF may take to print its first line under KVM (it takes
/// about 1 s; under TCG about 6 s).
const KVM_FIRST_OUTPUT: Duration = Duration::from_secs(20);

/// QEMU's words when KVM cannot emulate what the guest does (seen on
/// nested hosts: OVMF's first FPU instruction, then the guest pauses and
/// QEMU waits forever).
const KVM_INTERNAL_ERROR: &str = "KVM internal error";

/// KVM if it really runs the firmware the tests boot, else TCG.
/// `KILN_ACCEL=kvm|tcg` overrides. `/dev/kvm` opening is not enough, nor
/// is a tiny guest: on some hosts `-accel kvm` exits at once, on others a
/// tiny guest runs but OVMF stops with a KVM internal error. So the probe
/// boots OVMF itself to its first serial output under a deadline.
pub fn detect_accel() -> Accel {
    if let Some(a) = forced_accel() {
        return a;
    }
    static DETECTED: std::sync::OnceLock<Accel> = std::sync::OnceLock::new();
    *DETECTED.get_or_init(|| {
        let usable = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
            && probe(Accel::Kvm, KVM_FIRST_OUTPUT).unwrap_or(false);
        if usable { Accel::Kvm } else { Accel::Tcg }
    })
}

/// Boot OVMF with no disk and wait for its first line on the serial
/// console. True if it came within `deadline`; false if QEMU exited,
/// reported a KVM internal error, or stayed silent.
pub fn probe(accel: Accel, deadline: Duration) -> anyhow::Result<bool> {
    let mut cfg = VmConfig::with_accel("accel-probe", accel);
    cfg.memory_mib = 256;
    cfg.cpus = 1;
    let mut vm = Vm::spawn(&cfg, accel)?;
    Ok(vm.firmware_runs(deadline).is_ok())
}

/// A free TCP port on the loopback interface.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A second NIC joining a virtual LAN between VMs: one VM listens on a
/// loopback port, the other connects (QEMU `-netdev socket`).
#[derive(Debug, Clone)]
pub enum Lan {
    Listen(u16),
    Connect(u16),
}

/// What to boot and how.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub name: String,
    /// The disk image; `None` for a diskless (netbooted) machine.
    pub image: Option<PathBuf>,
    /// Boot from the network: QEMU's user networking hands out this
    /// TFTP directory and boot file (an iPXE script), and the NIC's iPXE
    /// ROM (ipxe-qemu) runs it.
    pub netboot: Option<NetBoot>,
    /// Grow the overlay's virtual disk to this many bytes (the image's
    /// size if `None`).
    pub disk_bytes: Option<u64>,
    /// More disks, on the buses of real machines, used in place (the
    /// caller's files: what a boot writes stays for the next boot).
    pub disks: Vec<Disk>,
    /// QEMU model of the management NIC: `virtio-net-pci`, or the
    /// `e1000e` of an Intel desktop board.
    pub nic_model: String,
    pub memory_mib: u32,
    pub cpus: u32,
    /// MAC of the management NIC (QEMU user networking, SSH forwarded).
    pub mac: String,
    /// Guest TCP ports to forward from the host's loopback (22 always).
    pub forward: Vec<u16>,
    /// Guest UDP ports forwarded from a host address (which must exist
    /// before QEMU starts): a WireGuard endpoint reached from outside.
    pub udp_forward: Vec<(std::net::SocketAddr, u16)>,
    /// An extra NIC on a virtual LAN, with this MAC.
    pub lan: Option<(Lan, String)>,
    /// The management NIC's subnet and the guest's static address on it,
    /// for nodes with a static LAN address (QEMU's DHCP is not used then).
    pub user_net: Option<(ipnet::IpNet, std::net::IpAddr)>,
    pub accel: Accel,
    /// Set by the caller to stop waiting: the waits return an
    /// interruption, and dropping the [`Vm`] kills QEMU.
    pub cancel: Cancel,
}

/// A disk attached as real machines attach theirs.
#[derive(Debug, Clone)]
pub struct Disk {
    /// A raw or qcow2 (by extension) file, used in place.
    pub file: PathBuf,
    pub bus: Bus,
    /// Firmware boot order (1 first); disks without one come last.
    pub bootindex: Option<u32>,
}

/// How a [`Disk`] is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bus {
    /// A USB stick: `usb-storage` on a `qemu-xhci` controller.
    Usb,
    /// An NVMe disk.
    Nvme,
    /// A SATA disk on q35's built-in AHCI controller.
    Sata,
}

impl Disk {
    pub fn new(file: &Path, bus: Bus, bootindex: Option<u32>) -> Self {
        Disk {
            file: file.to_path_buf(),
            bus,
            bootindex,
        }
    }
}

/// Drive options that keep a guest's disk writes small on the host: zeros
/// and discards (mkfs, the state partition an install writes as zeros)
/// become unallocated clusters instead of data.
const HOST_SPACE: &str = ",discard=unmap,detect-zeroes=unmap";

/// QEMU arguments for `disks` (`-drive` and `-device`, and the USB
/// controller if one is on USB).
fn disk_args(disks: &[Disk]) -> Vec<String> {
    let mut args = Vec::new();
    if disks.iter().any(|d| d.bus == Bus::Usb) {
        args.extend(["-device".into(), "qemu-xhci,id=xhci".into()]);
    }
    for (i, d) in disks.iter().enumerate() {
        let fmt = if d.file.extension().is_some_and(|e| e == "qcow2") {
            "qcow2"
        } else {
            "raw"
        };
        args.push("-drive".into());
        args.push(format!(
            "if=none,id=disk{i},format={fmt},file={}{HOST_SPACE}",
            d.file.display()
        ));
        let boot = d
            .bootindex
            .map(|b| format!(",bootindex={b}"))
            .unwrap_or_default();
        let device = match d.bus {
            Bus::Usb => format!("usb-storage,bus=xhci.0,drive=disk{i},removable=on{boot}"),
            Bus::Nvme => format!("nvme,drive=disk{i},serial=kiln-nvme-{i}{boot}"),
            Bus::Sata => format!("ide-hd,drive=disk{i},bus=ide.{i},serial=kiln-sata-{i}{boot}"),
        };
        args.extend(["-device".into(), device]);
    }
    args
}

/// What QEMU's built-in DHCP/TFTP hands a netbooting guest.
#[derive(Debug, Clone)]
pub struct NetBoot {
    pub tftp: PathBuf,
    pub bootfile: String,
}

impl VmConfig {
    pub fn new(name: &str, image: &Path) -> Self {
        let mut c = Self::diskless(name);
        c.image = Some(image.to_path_buf());
        c
    }

    /// A machine without a disk (set `netboot` to boot it).
    pub fn diskless(name: &str) -> Self {
        Self::with_accel(name, detect_accel())
    }

    /// A diskless machine under `accel` (the probe's: no detection).
    fn with_accel(name: &str, accel: Accel) -> Self {
        VmConfig {
            name: name.to_string(),
            image: None,
            netboot: None,
            disk_bytes: None,
            disks: Vec::new(),
            nic_model: "virtio-net-pci".into(),
            memory_mib: DEFAULT_MEMORY_MIB,
            cpus: 2,
            mac: "52:54:00:12:34:56".into(),
            forward: Vec::new(),
            udp_forward: Vec::new(),
            lan: None,
            user_net: None,
            accel,
            cancel: Cancel::default(),
        }
    }
}

/// One line of serial output and when the host saw it.
#[derive(Debug, Clone)]
pub struct SerialLine {
    pub at: Duration,
    pub text: String,
}

/// The overlay (backed by the image, enlarged to `disk_bytes`; `None`
/// without an image) and a writable copy of the OVMF variables, in `dir`.
fn prepare_disk(cfg: &VmConfig, dir: &Path) -> anyhow::Result<(Option<PathBuf>, PathBuf)> {
    for f in [OVMF_CODE, OVMF_VARS] {
        if !Path::new(f).exists() {
            bail!("{f} is missing: apt-get install --no-install-recommends ovmf");
        }
    }
    let vars = dir.join("OVMF_VARS.fd");
    fs_err::copy(OVMF_VARS, &vars)?;
    let Some(image) = &cfg.image else {
        return Ok((None, vars));
    };
    let overlay = dir.join("disk.qcow2");
    let image =
        std::fs::canonicalize(image).with_context(|| format!("image {}", image.display()))?;
    let fmt = if image.extension().is_some_and(|e| e == "qcow2") {
        "qcow2"
    } else {
        "raw"
    };
    let mut img = QEMU_IMG.command()?;
    img.args(["create", "-q", "-f", "qcow2", "-F", fmt, "-b"])
        .arg(&image)
        .arg(&overlay);
    if let Some(b) = cfg.disk_bytes {
        img.arg(b.to_string());
    }
    crate::util::tool::run(&mut img)?;
    Ok((Some(overlay), vars))
}

/// The iPXE ROM of QEMU's virtio NIC (BIOS and EFI in one file).
pub const IPXE_ROM: &str = "/usr/lib/ipxe/qemu/efi-virtio.rom";

/// QEMU with firmware, disk, RNG and the management NIC (`user_net` is
/// the `-netdev user,…` value); the caller adds the console.
fn qemu_command(
    cfg: &VmConfig,
    overlay: Option<&Path>,
    vars: &Path,
    user_net: &str,
) -> anyhow::Result<Command> {
    let mut cmd = QEMU.command()?;
    cmd.args(cfg.accel.args())
        .args(["-machine", "q35", "-nodefaults"])
        .arg("-m")
        .arg(cfg.memory_mib.to_string())
        .arg("-smp")
        .arg(cfg.cpus.to_string())
        .arg("-drive")
        .arg(format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}"))
        .arg("-drive")
        .arg(format!("if=pflash,format=raw,file={}", vars.display()));
    if let Some(o) = overlay {
        cmd.arg("-drive").arg(format!(
            "if=virtio,format=qcow2,file={}{HOST_SPACE}",
            o.display()
        ));
    }
    cmd.args(disk_args(&cfg.disks));
    let (netboot, nic_boot) = match &cfg.netboot {
        Some(nb) => {
            if !Path::new(IPXE_ROM).exists() {
                bail!("{IPXE_ROM} is missing: apt-get install --no-install-recommends ipxe-qemu");
            }
            (
                format!(",tftp={},bootfile={}", nb.tftp.display(), nb.bootfile),
                format!(",bootindex=1,romfile={IPXE_ROM}"),
            )
        }
        // No option ROM: the firmware boots the disks, not the network.
        None if cfg.nic_model != "virtio-net-pci" => (String::new(), ",romfile=".into()),
        None => (String::new(), String::new()),
    };
    cmd.args(["-device", "virtio-rng-pci"])
        .arg("-netdev")
        .arg(format!("user,id=mgmt{user_net}{netboot}"))
        .arg("-device")
        .arg(format!(
            "{},netdev=mgmt,mac={}{nic_boot}",
            cfg.nic_model, cfg.mac
        ));
    Ok(cmd)
}

/// Boot with the serial console on this terminal (`kiln run`).
pub fn interactive(cfg: &VmConfig) -> anyhow::Result<std::process::ExitStatus> {
    let dir = tempfile::Builder::new().prefix("kiln-run-").tempdir()?;
    let (overlay, vars) = prepare_disk(cfg, dir.path())?;
    let port = free_port()?;
    eprintln!("kiln run: SSH is forwarded from 127.0.0.1:{port}");
    let mut cmd = qemu_command(
        cfg,
        overlay.as_deref(),
        &vars,
        &format!(",hostfwd=tcp:127.0.0.1:{port}-:22"),
    )?;
    cmd.args(["-nographic", "-serial", "mon:stdio"]);
    let line = crate::util::tool::display(&cmd);
    let mut child = cmd.spawn().with_context(|| format!("starting {line}"))?;
    crate::util::tool::wait(&mut child, &line, &cfg.cancel)
}

/// A running VM. Dropping it kills QEMU.
pub struct Vm {
    pub name: String,
    /// What this VM really runs under (TCG after a KVM failure).
    pub accel: Accel,
    child: Child,
    dir: tempfile::TempDir,
    pub started: Instant,
    serial: Arc<Mutex<Vec<SerialLine>>>,
    /// Host port → guest port.
    pub ports: Vec<(u16, u16)>,
    keep_log: Option<PathBuf>,
    cancel: Cancel,
}

impl Vm {
    /// Start QEMU. The serial console is read line by line with host
    /// timestamps. Under KVM the firmware must print within
    /// [`KVM_FIRST_OUTPUT`]; if it does not (a KVM internal error, QEMU
    /// exiting), the VM is restarted under TCG, and so is every later one,
    /// unless `KILN_ACCEL=kvm` asked for KVM.
    pub fn start(cfg: &VmConfig) -> anyhow::Result<Vm> {
        crate::util::tool::preflight(&[QEMU, QEMU_IMG])?;
        let kvm_wanted = cfg.accel == Accel::Kvm;
        if !kvm_wanted || KVM_BROKEN.load(std::sync::atomic::Ordering::SeqCst) {
            return Vm::spawn(cfg, Accel::Tcg);
        }
        let mut vm = Vm::spawn(cfg, Accel::Kvm)?;
        let Err(why) = vm.firmware_runs(KVM_FIRST_OUTPUT) else {
            return Ok(vm);
        };
        cfg.cancel.check()?;
        if forced_accel() == Some(Accel::Kvm) {
            bail!(
                "{}: KILN_ACCEL=kvm, but {why}; unset KILN_ACCEL to fall back to TCG\n{}",
                cfg.name,
                vm.tail(20)
            );
        }
        drop(vm);
        if !KVM_BROKEN.swap(true, std::sync::atomic::Ordering::SeqCst) {
            eprintln!(
                "kiln: {why}: using TCG (software emulation) from now on; KILN_ACCEL=tcg skips KVM"
            );
        }
        Vm::spawn(cfg, Accel::Tcg)
    }

    /// Ok once the firmware printed a line on the serial console; the
    /// reason otherwise. Used on a VM just started under KVM.
    fn firmware_runs(&mut self, deadline: Duration) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if self.cancel.is_cancelled() {
                return Err("interrupted".into());
            }
            let lines = self.serial_lines();
            if let Some(l) = lines.iter().find(|l| l.text.contains(KVM_INTERNAL_ERROR)) {
                return Err(format!(
                    "KVM cannot run the firmware here ({})",
                    l.text.trim_start_matches("[qemu stderr] ")
                ));
            }
            if lines.iter().any(|l| !l.text.starts_with("[qemu stderr]")) {
                return Ok(());
            }
            if !self.running() {
                let said = lines.last().map(|l| l.text.clone()).unwrap_or_default();
                return Err(format!(
                    "QEMU with KVM exited before the firmware printed anything ({said})"
                ));
            }
            if start.elapsed() > deadline {
                return Err(format!(
                    "the firmware printed nothing for {} s under KVM",
                    deadline.as_secs()
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Start QEMU with `accel`, whatever the config says.
    fn spawn(cfg: &VmConfig, accel: Accel) -> anyhow::Result<Vm> {
        let cfg = &VmConfig {
            accel,
            ..cfg.clone()
        };
        let dir = tempfile::Builder::new()
            .prefix(&format!("kiln-vm-{}-", cfg.name))
            .tempdir()?;
        let (overlay, vars) = prepare_disk(cfg, dir.path())?;

        let mut ports = vec![(free_port()?, 22u16)];
        for p in &cfg.forward {
            ports.push((free_port()?, *p));
        }
        let guest = cfg
            .user_net
            .map(|(_, ip)| ip.to_string())
            .unwrap_or_default();
        let mut fwd: String = ports
            .iter()
            .map(|(h, g)| format!(",hostfwd=tcp:127.0.0.1:{h}-{guest}:{g}"))
            .collect();
        for (h, g) in &cfg.udp_forward {
            fwd.push_str(&format!(",hostfwd=udp:{h}-{guest}:{g}"));
        }
        if let Some((net, ip)) = cfg.user_net {
            fwd = format!(",net={}{fwd}", net.trunc());
            if cfg.netboot.is_some() {
                // iPXE and the initramfs ask DHCP: hand out the node's address.
                fwd.push_str(&format!(",dhcpstart={ip}"));
            }
        }
        let mut cmd = qemu_command(cfg, overlay.as_deref(), &vars, &fwd)?;
        cmd.args(["-display", "none", "-monitor", "none", "-serial", "stdio"]);
        if let Some((lan, mac)) = &cfg.lan {
            let spec = match lan {
                Lan::Listen(p) => format!("socket,id=lan,listen=127.0.0.1:{p}"),
                Lan::Connect(p) => format!("socket,id=lan,connect=127.0.0.1:{p}"),
            };
            cmd.arg("-netdev")
                .arg(spec)
                .arg("-device")
                .arg(format!("virtio-net-pci,netdev=lan,mac={mac}"));
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        log::info!(
            "starting {}: {}",
            cfg.name,
            crate::util::tool::display(&cmd)
        );
        let started = Instant::now();
        let mut child = cmd.spawn().context("starting qemu")?;
        let serial: Arc<Mutex<Vec<SerialLine>>> = Arc::default();
        let out = child.stdout.take().expect("piped");
        let sink = serial.clone();
        std::thread::spawn(move || {
            let mut r = std::io::BufReader::new(out);
            let mut buf = Vec::new();
            while r
                .read_until(b'\n', &mut buf)
                .map(|n| n > 0)
                .unwrap_or(false)
            {
                let text = String::from_utf8_lossy(&buf)
                    .trim_end_matches(['\r', '\n'])
                    .to_string();
                sink.lock().unwrap().push(SerialLine {
                    at: started.elapsed(),
                    text,
                });
                buf.clear();
            }
        });
        // Line by line, not at exit: a KVM internal error is printed while
        // QEMU keeps running.
        let err = std::io::BufReader::new(child.stderr.take().expect("piped"));
        let err_sink = serial.clone();
        std::thread::spawn(move || {
            for l in err.lines().map_while(Result::ok) {
                err_sink.lock().unwrap().push(SerialLine {
                    at: started.elapsed(),
                    text: format!("[qemu stderr] {l}"),
                });
            }
        });
        Ok(Vm {
            name: cfg.name.clone(),
            accel,
            child,
            dir,
            started,
            serial,
            ports,
            keep_log: None,
            cancel: cfg.cancel.clone(),
        })
    }

    /// Keep the serial log at `path` when the VM is dropped.
    pub fn keep_log(&mut self, path: &Path) {
        self.keep_log = Some(path.to_path_buf());
    }

    pub fn ssh_port(&self) -> u16 {
        self.ports[0].0
    }

    /// The host port forwarded to `guest` port.
    pub fn host_port(&self, guest: u16) -> Option<u16> {
        self.ports
            .iter()
            .find(|(_, g)| *g == guest)
            .map(|(h, _)| *h)
    }

    pub fn serial_lines(&self) -> Vec<SerialLine> {
        self.serial.lock().unwrap().clone()
    }

    pub fn serial_text(&self) -> String {
        self.serial_lines()
            .iter()
            .map(|l| format!("[{:7.2}] {}\n", l.at.as_secs_f64(), l.text))
            .collect()
    }

    /// The first serial line containing `needle` after the `nth` earlier
    /// ones (0 = first occurrence).
    pub fn serial_find(&self, needle: &str, nth: usize) -> Option<SerialLine> {
        self.serial_lines()
            .into_iter()
            .filter(|l| l.text.contains(needle))
            .nth(nth)
    }

    /// Is QEMU still running?
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Wait until `needle` has appeared `nth + 1` times on the console.
    pub fn wait_serial(
        &mut self,
        needle: &str,
        nth: usize,
        timeout: Duration,
    ) -> anyhow::Result<SerialLine> {
        let what = format!("{} console line {needle:?} (#{})", self.name, nth + 1);
        self.wait_until(&what, timeout, |vm| Ok(vm.serial_find(needle, nth)))
    }

    /// Poll `f` until it returns `Some`, QEMU exits, or `timeout` passes.
    pub fn wait_until<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&mut Self) -> anyhow::Result<Option<T>>,
    ) -> anyhow::Result<T> {
        let start = Instant::now();
        loop {
            self.cancel.check()?;
            if let Some(v) = f(self)? {
                return Ok(v);
            }
            self.host_has_space()?;
            if !self.running() {
                bail!(
                    "{}: QEMU exited while waiting for {what}\n{}",
                    self.name,
                    self.tail(60)
                );
            }
            if start.elapsed() > timeout {
                bail!(
                    "{}: timed out after {} s waiting for {what}\n{}",
                    self.name,
                    timeout.as_secs(),
                    self.tail(60)
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// An error once QEMU reported that the host filesystem holding this
    /// VM's disks is full: the guest sees I/O errors from then on, and
    /// waiting for it only ends in a timeout.
    fn host_has_space(&self) -> anyhow::Result<()> {
        let full = self.serial_lines().into_iter().find(|l| {
            l.text.starts_with("[qemu stderr]") && l.text.contains("No space left on device")
        });
        let Some(line) = full else {
            return Ok(());
        };
        let free = crate::util::space::free_bytes(self.dir.path())
            .map_or("?".into(), |b| crate::util::space::mib(b).to_string());
        bail!(
            "{}: the host filesystem holding this VM's disks ({}) is full: QEMU said {:?} ({free} MiB free now); free space there or set TMPDIR to a bigger filesystem, then run again\n{}",
            self.name,
            self.dir
                .path()
                .parent()
                .unwrap_or(self.dir.path())
                .display(),
            line.text.trim_start_matches("[qemu stderr] "),
            self.tail(20)
        )
    }

    /// The last `n` console lines, for error messages.
    pub fn tail(&self, n: usize) -> String {
        let lines = self.serial_lines();
        let from = lines.len().saturating_sub(n);
        let mut s = format!(
            "--- last {} console lines of {} ---\n",
            lines.len() - from,
            self.name
        );
        for l in &lines[from..] {
            s.push_str(&format!("[{:7.2}] {}\n", l.at.as_secs_f64(), l.text));
        }
        s
    }

    /// One SSH connection per VM and user, reused by every command (the
    /// checks run dozens). The master is started with no stdio of ours: a
    /// master inheriting a command's pipes would keep them open.
    fn ensure_master(&self, key: &Path, user: &str) {
        let Ok(mut check) = self.ssh_base(key, user, "no") else {
            return;
        };
        let alive = check
            .args(["-O", "check"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !alive && let Ok(mut m) = self.ssh_base(key, user, "yes") {
            let _ = m
                .args(["-o", "ControlPersist=300", "-f", "-N"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }

    fn ssh_base(&self, key: &Path, user: &str, master: &str) -> anyhow::Result<Command> {
        let mut c = SSH.command()?;
        let control = self.dir.path().join(format!("ssh-{user}"));
        c.arg("-i")
            .arg(key)
            .arg("-o")
            .arg(format!("ControlPath={}", control.display()))
            .arg("-o")
            .arg(format!("ControlMaster={master}"))
            .args(["-p", &self.ssh_port().to_string()])
            .args(SSH_OPTIONS)
            .args(["-o", "IdentitiesOnly=yes"])
            .arg(format!("{user}@127.0.0.1"));
        Ok(c)
    }

    /// Run a shell command in the guest as `user`, with `stdin`.
    pub fn ssh_as(
        &self,
        key: &Path,
        user: &str,
        script: &str,
        stdin: &[u8],
    ) -> anyhow::Result<Output> {
        self.ensure_master(key, user);
        let mut c = self.ssh_base(key, user, "no")?;
        c.arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().context("starting ssh")?;
        child.stdin.take().expect("piped").write_all(stdin)?;
        wait_with_deadline(child, SSH_COMMAND_DEADLINE)
            .with_context(|| format!("{}: running `{script}` over SSH", self.name))
    }

    /// Run a shell command in the guest as root; its stdout, or an error
    /// with its stderr.
    pub fn sh(&self, key: &Path, script: &str) -> anyhow::Result<String> {
        let out = self.ssh_as(key, "root", script, b"")?;
        if !out.status.success() {
            bail!(
                "{}: `{script}` failed ({}): {}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    /// Wait until SSH as root works.
    pub fn wait_ssh(&mut self, key: &Path, timeout: Duration) -> anyhow::Result<Duration> {
        let what = format!("SSH on {}", self.name);
        let key = key.to_path_buf();
        self.wait_until(&what, timeout, |vm| {
            Ok(vm
                .ssh_as(&key, "root", "true", b"")
                .ok()
                .filter(|o| o.status.success())
                .map(|_| vm.started.elapsed()))
        })
    }

    /// Wait for QEMU to exit (after a poweroff in the guest).
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let what = format!("{} to power off", self.name);
        let start = Instant::now();
        while start.elapsed() < timeout {
            if !self.running() {
                return Ok(());
            }
            self.cancel.check()?;
            std::thread::sleep(POLL);
        }
        bail!("timed out waiting for {what}\n{}", self.tail(40))
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(p) = &self.keep_log {
            let _ = std::fs::write(p, self.serial_text());
        }
        if std::thread::panicking() {
            eprintln!("{}", self.tail(80));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_that_never_answers_is_killed_at_its_deadline() {
        let child = Command::new("sleep")
            .arg("30")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = wait_with_deadline(child, Duration::from_millis(300)).unwrap_err();
        assert!(err.to_string().contains("no answer within"), "{err}");
    }

    #[test]
    fn a_command_that_answers_gives_its_output() {
        let child = Command::new("sh")
            .args(["-c", "echo out; echo err >&2; exit 3"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = wait_with_deadline(child, Duration::from_secs(30)).unwrap();
        assert_eq!(
            (out.stdout.as_slice(), out.stderr.as_slice()),
            (&b"out\n"[..], &b"err\n"[..])
        );
        assert_eq!(out.status.code(), Some(3));
    }

    #[test]
    fn ssh_gives_up_on_a_silent_guest() {
        let opts = SSH_OPTIONS.join(" ");
        assert!(
            opts.contains("ServerAliveInterval=5") && opts.contains("ServerAliveCountMax=6"),
            "{opts}"
        );
    }
}

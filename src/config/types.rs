//! Small value types parsed where they enter: versions, MACs, host names,
//! endpoints, WireGuard keys. Each `parse` returns a message fit for a
//! diagnostic (what is wrong) and a hint (how to fix it).

use std::fmt;
use std::net::IpAddr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

/// A parse failure: what is wrong, and how to write it instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub message: String,
    pub hint: String,
}

fn invalid(message: impl Into<String>, hint: impl Into<String>) -> Invalid {
    Invalid {
        message: message.into(),
        hint: hint.into(),
    }
}

/// A k3s release tag such as `v1.31.1+k3s1`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct K3sVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
    pub k3s: u32,
}

impl K3sVersion {
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        let bad = || {
            invalid(
                format!("`{s}` is not a k3s release tag"),
                "write a tag from the k3s releases page, like \"v1.31.1+k3s1\"",
            )
        };
        let rest = s.strip_prefix('v').ok_or_else(bad)?;
        let (semver, build) = rest.split_once("+k3s").ok_or_else(bad)?;
        let nums: Vec<&str> = semver.split('.').collect();
        if nums.len() != 3 {
            return Err(bad());
        }
        let num = |t: &str| -> Result<u32, Invalid> {
            if t.is_empty()
                || !t.bytes().all(|b| b.is_ascii_digit())
                || (t.len() > 1 && t.starts_with('0'))
            {
                return Err(bad());
            }
            t.parse().map_err(|_| bad())
        };
        Ok(K3sVersion {
            major: num(nums[0])?,
            minor: num(nums[1])?,
            patch: num(nums[2])?,
            k3s: num(build)?,
        })
    }
}

impl fmt::Display for K3sVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "v{}.{}.{}+k3s{}",
            self.major, self.minor, self.patch, self.k3s
        )
    }
}

/// An Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        let bad = || {
            invalid(
                format!("`{s}` is not a MAC address"),
                "write six hex pairs separated by colons, like \"52:54:00:12:34:56\"",
            )
        };
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut out = [0u8; 6];
        for (o, p) in out.iter_mut().zip(&parts) {
            if p.len() != 2 {
                return Err(bad());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if out == [0; 6] {
            return Err(invalid(
                format!("`{s}` is the all-zero MAC address, not a NIC's"),
                "copy the address printed by `ip link` on the machine",
            ));
        }
        if out == [0xff; 6] {
            return Err(invalid(
                format!("`{s}` is the broadcast MAC address, not a NIC's"),
                "copy the address printed by `ip link` on the machine",
            ));
        }
        // The low bit of the first octet marks a group (multicast) address.
        if out[0] & 1 == 1 {
            return Err(invalid(
                format!("`{s}` is a multicast MAC address, not a NIC's"),
                "copy the address printed by `ip link` on the machine",
            ));
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// Is `s` a valid host name (RFC 1123: dot-separated labels of letters,
/// digits and inner hyphens, each at most 63 characters, 253 in all)?
pub fn is_hostname(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// Is `s` one RFC 1123 label?
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

pub fn parse_hostname(s: &str) -> Result<String, Invalid> {
    if is_hostname(s) {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(invalid(
            format!("`{s}` is not a valid host name"),
            "use letters, digits and inner hyphens, at most 63 characters per dot-separated label (RFC 1123)",
        ))
    }
}

/// A host: an IP address or a DNS name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Ip(IpAddr),
    Name(String),
}

impl Host {
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Host::Ip(ip));
        }
        if s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return Err(invalid(
                format!("`{s}` is not a valid IP address"),
                "write four numbers 0-255 separated by dots",
            ));
        }
        parse_hostname(s).map(Host::Name).map_err(|_| {
            invalid(
                format!("`{s}` is neither an IP address nor a valid host name"),
                "write an IP like \"10.0.0.1\" or a DNS name like \"hub.example.org\"",
            )
        })
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(ip) => write!(f, "{ip}"),
            Host::Name(n) => write!(f, "{n}"),
        }
    }
}

/// `host:port`, as in a WireGuard `Endpoint`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: Host,
    pub port: u16,
}

impl Endpoint {
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        let bad = || {
            invalid(
                format!("`{s}` is not host:port"),
                "write a host and a port, like \"hub.example.org:51820\" or \"[2001:db8::1]:51820\"",
            )
        };
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, p) = rest.split_once("]:").ok_or_else(bad)?;
            (h, p)
        } else {
            s.rsplit_once(':').ok_or_else(bad)?
        };
        let port = parse_port_str(port).map_err(|_| bad())?;
        Ok(Endpoint {
            host: Host::parse(host)?,
            port,
        })
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

fn parse_port_str(s: &str) -> Result<u16, ()> {
    match s.parse::<u16>() {
        Ok(0) | Err(_) => Err(()),
        Ok(p) => Ok(p),
    }
}

/// A WireGuard public key: 32 bytes, base64 as `wg pubkey` prints it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct WgKey(pub [u8; 32]);

impl WgKey {
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        let bad = |why: &str| {
            invalid(
                format!("`{s}` is not a WireGuard key: {why}"),
                "paste the output of `wg pubkey` on that host: 44 characters of base64 ending in '='",
            )
        };
        let bytes = B64.decode(s.trim()).map_err(|_| bad("not base64"))?;
        let arr: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| bad(&format!("{} bytes, not 32", bytes.len())))?;
        Ok(WgKey(arr))
    }

    pub fn to_base64(&self) -> String {
        B64.encode(self.0)
    }
}

impl fmt::Display for WgKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

/// A kernel command line item must not break the boot entry's `options`
/// line: no whitespace, no quotes, no control characters.
pub fn check_cmdline_item(s: &str) -> Result<(), Invalid> {
    if s.is_empty() {
        return Err(invalid(
            "empty kernel command line item",
            "remove the empty string",
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || *c == '"' || *c == '\'')
    {
        return Err(invalid(
            format!(
                "kernel command line item `{}` contains {:?}",
                s.escape_debug(),
                c
            ),
            "give each item as its own string, without spaces, quotes or control characters, like \"pcie_aspm=off\"",
        ));
    }
    Ok(())
}

/// A block device named by its path under `/dev/`: `/dev/nvme0n1`, or a
/// stable `/dev/disk/by-id/...` link. In its one normal form (no empty,
/// `.` or `..` components, no trailing `/`) and without whitespace or
/// control characters, so it fits on a `key=value` line of a node file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePath(String);

impl DevicePath {
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        const EXAMPLE: &str = "like \"/dev/disk/by-id/nvme-Samsung_SSD_980_S64DNX0R123456\" (see `ls -l /dev/disk/by-id/` on the machine) or \"/dev/nvme0n1\"";
        if let Some(c) = s.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid(
                format!("device path `{}` contains {c:?}", s.escape_debug()),
                format!("write the path without spaces or control characters, {EXAMPLE}"),
            ));
        }
        let Some(rest) = s.strip_prefix("/dev/") else {
            return Err(invalid(
                format!("`{s}` is not a path under /dev/"),
                format!("name the whole disk by its device path, {EXAMPLE}"),
            ));
        };
        if rest
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(invalid(
                format!("device path `{s}` has an empty, `.` or `..` component"),
                format!("write the path as `ls` shows it, without `..`, `.` or `//`, {EXAMPLE}"),
            ));
        }
        Ok(DevicePath(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DevicePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What k3s decompresses when it imports an image tarball from
/// `agent/images` (k3s's list is longer: `.tar.lz4`, `.tar.bz2`, `.tgz`,
/// …); kiln takes the three forms k3s's own releases publish theirs in.
pub const IMAGE_TARBALL_EXTENSIONS: [&str; 3] = [".tar.zst", ".tar.gz", ".tar"];

/// The extension of `name` among [`IMAGE_TARBALL_EXTENSIONS`], when
/// something precedes it (`.tar` alone is not a tarball's name).
pub fn image_tarball_extension(name: &str) -> Option<&'static str> {
    IMAGE_TARBALL_EXTENSIONS
        .into_iter()
        .find(|ext| name.len() > ext.len() && name.ends_with(ext))
}

/// An image tarball the profile names (`k3s.image-tarballs`): a path,
/// absolute or relative to the profile's directory, whose file name ends
/// in an extension k3s imports. The file name is its name on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageTarballPath {
    path: std::path::PathBuf,
    name: String,
}

impl ImageTarballPath {
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        let exts = IMAGE_TARBALL_EXTENSIONS.join(", ");
        if s.chars().any(char::is_control) {
            return Err(invalid(
                format!("path `{}` contains a control character", s.escape_debug()),
                "write the path on one line, without NUL, newline or tab",
            ));
        }
        let name = s.rsplit('/').next().unwrap_or_default();
        if name.is_empty() || name == "." || name == ".." {
            return Err(invalid(
                format!("`{s}` does not name a file"),
                "write the path of the tarball file, like \"images/registry.tar.zst\"",
            ));
        }
        if image_tarball_extension(name).is_none() {
            return Err(invalid(
                format!(
                    "`{name}` is not an image tarball k3s imports: its name must end in one of {exts}"
                ),
                "write the tarball as `docker save IMAGE… | zstd -o NAME.tar.zst` (or keep it a plain .tar, or gzip it) and name it so",
            ));
        }
        Ok(ImageTarballPath {
            path: std::path::PathBuf::from(s),
            name: name.to_string(),
        })
    }

    /// The path as written.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The file name: its name in the image and on the node.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A k3s token: the secret written in the profile, or the secure form
/// (`K10<CA hash>::server:<secret>`) nodes join with. Anyone holding it
/// can join the cluster, so its `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct K3sToken(String);

impl K3sToken {
    /// Wraps a token; checking it ([`is_valid_token`]) is the caller's job,
    /// where it can say which file or key held it.
    pub fn new(token: impl Into<String>) -> Self {
        K3sToken(token.into())
    }

    /// The token itself. Only for files that hold secrets and for parsing
    /// its parts.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for K3sToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("K3sToken(<redacted>)")
    }
}

/// The shortest k3s token kiln accepts, in the profile or the state dir.
pub const MIN_TOKEN_CHARS: usize = 16;

/// Is `s` usable as a k3s token: long enough, no whitespace or control
/// characters (it goes on a `token:` line of k3s's config)?
pub fn is_valid_token(s: &str) -> bool {
    s.len() >= MIN_TOKEN_CHARS && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// A Unix user or group name as Debian's `adduser` accepts by default.
pub fn is_unix_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && (b[0].is_ascii_lowercase() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k3s_versions() {
        let v = K3sVersion::parse("v1.31.1+k3s1").unwrap();
        assert_eq!(v.to_string(), "v1.31.1+k3s1");
        assert!(v < K3sVersion::parse("v1.31.10+k3s1").unwrap());
        for bad in [
            "1.31.1+k3s1",
            "v1.31+k3s1",
            "v1.31.1",
            "v1.31.1-k3s1",
            "latest",
            "v1.31.1+k3s",
            "v01.31.1+k3s1",
        ] {
            assert!(K3sVersion::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn macs() {
        assert_eq!(
            MacAddr::parse("52:54:00:AB:cd:01").unwrap().to_string(),
            "52:54:00:ab:cd:01"
        );
        assert!(MacAddr::parse("52:54:00:ab:cd").is_err());
        assert!(MacAddr::parse("01:00:5e:00:00:01").is_err());
        assert!(MacAddr::parse("52:54:00:ab:cd:zz").is_err());
    }

    #[test]
    fn all_zero_broadcast_and_multicast_macs_are_refused() {
        for (mac, why) in [
            ("00:00:00:00:00:00", "all-zero"),
            ("ff:ff:ff:ff:ff:ff", "broadcast"),
            ("FF-FF-FF-FF-FF-FF", "broadcast"),
            ("33:33:00:00:00:01", "multicast"),
        ] {
            let e = MacAddr::parse(mac).unwrap_err();
            assert!(e.message.contains(why), "{mac}: {e:?}");
            assert!(e.hint.contains("ip link"), "{mac}: {e:?}");
        }
        assert!(MacAddr::parse("02:00:00:00:00:00").is_ok());
    }

    #[test]
    fn hostnames() {
        assert!(is_hostname("rgb1"));
        assert!(is_hostname("hub.example.org"));
        assert!(!is_hostname("-rgb"));
        assert!(!is_hostname("rgb_1"));
        assert!(!is_hostname(&"a".repeat(64)));
    }

    #[test]
    fn endpoints() {
        let e = Endpoint::parse("hub.example.org:51820").unwrap();
        assert_eq!(e.to_string(), "hub.example.org:51820");
        assert_eq!(
            Endpoint::parse("[2001:db8::1]:51820").unwrap().to_string(),
            "[2001:db8::1]:51820"
        );
        assert!(Endpoint::parse("hub.example.org").is_err());
        assert!(Endpoint::parse("hub:0").is_err());
        assert!(Endpoint::parse("hub:70000").is_err());
    }

    #[test]
    fn wg_keys() {
        let k = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
        assert_eq!(WgKey::parse(k).unwrap().to_base64(), k);
        assert!(
            WgKey::parse("AAAA")
                .unwrap_err()
                .message
                .contains("3 bytes")
        );
        assert!(WgKey::parse("not base64!").is_err());
    }

    #[test]
    fn image_tarball_paths() {
        let t = ImageTarballPath::parse("images/registry.tar.zst").unwrap();
        assert_eq!(t.name(), "registry.tar.zst");
        assert_eq!(t.path(), std::path::Path::new("images/registry.tar.zst"));
        assert_eq!(
            ImageTarballPath::parse("/srv/a.tar").unwrap().name(),
            "a.tar"
        );
        assert_eq!(image_tarball_extension("a.tar.gz"), Some(".tar.gz"));
        assert_eq!(image_tarball_extension("a.tar.zst"), Some(".tar.zst"));
        for bad in [
            "a.zip", "a.tar.xz", "images/", ".tar", "a.tgz", "..", "a\n.tar",
        ] {
            assert!(ImageTarballPath::parse(bad).is_err(), "{bad:?}");
        }
        let e = ImageTarballPath::parse("images/a.tar.xz").unwrap_err();
        assert!(
            e.message.contains("a.tar.xz") && e.message.contains(".tar.zst"),
            "{}",
            e.message
        );
    }

    #[test]
    fn cmdline_items() {
        assert!(check_cmdline_item("pcie_aspm=off").is_ok());
        assert!(check_cmdline_item("a b").is_err());
        assert!(check_cmdline_item("a\"b").is_err());
        assert!(check_cmdline_item("a\nb").is_err());
    }

    #[test]
    fn device_paths() {
        for good in [
            "/dev/nvme0n1",
            "/dev/sda",
            "/dev/disk/by-id/nvme-Samsung_SSD_980_S64DNX0R123456",
            "/dev/disk/by-id/ata-ST1000DM010-2EP102_Z9A1B2C3",
        ] {
            assert_eq!(DevicePath::parse(good).unwrap().as_str(), good);
        }
        for (bad, why) in [
            ("nvme0n1", "not a path under /dev/"),
            ("/dev", "not a path under /dev/"),
            ("/dev/", "empty"),
            ("/mnt/disk", "not a path under /dev/"),
            ("/dev/../etc/passwd", "`..`"),
            ("/dev/disk/by-id/./x", "`.`"),
            ("/dev//sda", "empty"),
            ("/dev/sda/", "empty"),
            ("/dev/sd a", "' '"),
            ("/dev/sda\n", "'\\n'"),
        ] {
            let e = DevicePath::parse(bad).unwrap_err();
            assert!(e.message.contains(why), "{bad:?}: {e:?}");
            assert!(e.hint.contains("/dev/disk/by-id/"), "{bad:?}: {e:?}");
        }
    }
}

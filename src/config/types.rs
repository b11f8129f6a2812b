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

/// How old something may grow before it is made again, as whole days or
/// hours: `"30d"`, `"12h"`. One number and one unit, nothing else: no
/// spaces, signs, fractions, leading zeros or mixed units, so there is
/// one way to write each value. At least one hour; at most ten years.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxAge {
    count: u64,
    unit: AgeUnit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AgeUnit {
    Days,
    Hours,
}

const SECS_PER_HOUR: u64 = 3600;
const SECS_PER_DAY: u64 = 24 * SECS_PER_HOUR;
/// The longest max-age accepted, in days (ten years): enough to mean
/// "practically never" without overflow or a typo of extra zeros passing.
const MAX_AGE_LIMIT_DAYS: u64 = 3650;

impl MaxAge {
    /// `days` whole days.
    pub const fn days(days: u64) -> Self {
        MaxAge {
            count: days,
            unit: AgeUnit::Days,
        }
    }

    pub fn parse(s: &str) -> Result<Self, Invalid> {
        const HINT: &str = "write a whole number of days or hours, like \"30d\" or \"12h\"";
        let (digits, unit) = match s.char_indices().last() {
            Some((i, 'd')) => (&s[..i], AgeUnit::Days),
            Some((i, 'h')) => (&s[..i], AgeUnit::Hours),
            _ => return Err(invalid(format!("`{s}` has no unit (d or h)"), HINT)),
        };
        if digits.is_empty()
            || !digits.bytes().all(|b| b.is_ascii_digit())
            || (digits.len() > 1 && digits.starts_with('0'))
        {
            return Err(invalid(
                format!("`{s}` is not a number of days or hours"),
                HINT,
            ));
        }
        let count: u64 = digits.parse().unwrap_or(u64::MAX);
        let age = MaxAge { count, unit };
        if count == 0 {
            return Err(invalid(
                format!("a max-age of `{s}` would rebuild on every build"),
                "write at least \"1h\"; to rebuild once, use `kiln build --refresh-base`",
            ));
        }
        if count > MAX_AGE_LIMIT_DAYS * SECS_PER_DAY / age.unit_secs() {
            return Err(invalid(
                format!("`{s}` is more than ten years"),
                format!("write at most \"{MAX_AGE_LIMIT_DAYS}d\""),
            ));
        }
        Ok(age)
    }

    fn unit_secs(&self) -> u64 {
        match self.unit {
            AgeUnit::Days => SECS_PER_DAY,
            AgeUnit::Hours => SECS_PER_HOUR,
        }
    }

    pub fn as_secs(&self) -> u64 {
        self.count * self.unit_secs()
    }
}

impl fmt::Display for MaxAge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.unit {
            AgeUnit::Days => 'd',
            AgeUnit::Hours => 'h',
        };
        write!(f, "{}{unit}", self.count)
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

/// An HTTP proxy for k3s and containerd (`HTTP_PROXY`, `HTTPS_PROXY`):
/// `http://` or `https://`, optional `user:password@`, a host, an
/// optional port, nothing after it but one `/`. Its text goes unquoted
/// into a systemd environment file, so it holds no whitespace, quotes,
/// `$` or `\`: other characters in credentials are percent-encoded.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    scheme: &'static str,
    userinfo: Option<String>,
    host: Host,
    port: Option<u16>,
}

impl ProxyUrl {
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        let bad = |why: &str| {
            invalid(
                format!("`{}` is not a proxy URL: {why}", s.escape_debug()),
                "write http://HOST:PORT, like \"http://proxy.campus.example:3128\" (credentials as http://user:password@HOST:PORT, other characters percent-encoded)",
            )
        };
        let (scheme, rest) = match s.split_once("://") {
            Some((sc, rest)) if sc.eq_ignore_ascii_case("http") => ("http", rest),
            Some((sc, rest)) if sc.eq_ignore_ascii_case("https") => ("https", rest),
            Some((sc, _)) => return Err(bad(&format!("scheme `{sc}` is not http or https"))),
            None => return Err(bad("no http:// or https://")),
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#']) {
            return Err(bad("a proxy URL has no path, query or fragment"));
        }
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        if let Some(u) = userinfo
            && (u.is_empty() || !is_userinfo(u))
        {
            return Err(bad(
                "the credentials before `@` may hold letters, digits, -._~!&()*+,;=: and %XX only",
            ));
        }
        let (host, port) = split_host_port(hostport)
            .filter(|(h, _)| !h.is_empty())
            .ok_or_else(|| bad("no host, or not host:port"))?;
        let host = Host::parse(host).map_err(|e| bad(&e.message))?;
        let port = match port {
            None => None,
            Some(p) => Some(parse_port_str(p).map_err(|_| bad("the port is not 1 to 65535"))?),
        };
        Ok(ProxyUrl {
            scheme,
            userinfo: userinfo.map(str::to_string),
            host,
            port,
        })
    }

    /// The URL with its password (if any) replaced by `***`, for output
    /// meant for people.
    pub fn redacted(&self) -> String {
        let user = self.userinfo.as_ref().map(|u| match u.split_once(':') {
            Some((name, _)) => format!("{name}:***@"),
            None => format!("{u}@"),
        });
        self.with_userinfo(user.as_deref().unwrap_or(""))
    }

    fn with_userinfo(&self, userinfo: &str) -> String {
        let port = self.port.map(|p| format!(":{p}")).unwrap_or_default();
        format!("{}://{userinfo}{}{port}", self.scheme, self.host)
    }
}

impl fmt::Display for ProxyUrl {
    /// The whole URL, credentials included: only for files that hold secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let user = self.userinfo.as_ref().map(|u| format!("{u}@"));
        f.write_str(&self.with_userinfo(user.as_deref().unwrap_or("")))
    }
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProxyUrl({})", self.redacted())
    }
}

/// RFC 3986 userinfo, less the characters a systemd environment file or a
/// shell would read specially (`$`, `'`): unreserved, sub-delims, `:` and
/// percent-escapes.
fn is_userinfo(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if b.len() > i + 2
                && b[i + 1].is_ascii_hexdigit()
                && b[i + 2].is_ascii_hexdigit() =>
            {
                i += 3;
                continue;
            }
            c if c.is_ascii_alphanumeric() || b"-._~!&()*+,;=:".contains(&c) => {}
            _ => return false,
        }
        i += 1;
    }
    true
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`, split; `None` if malformed.
fn split_host_port(s: &str) -> Option<(&str, Option<&str>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        return match after {
            "" => Some((h, None)),
            p => Some((h, Some(p.strip_prefix(':')?))),
        };
    }
    match s.split_once(':') {
        Some((h, p)) if !p.contains(':') => Some((h, Some(p))),
        Some(_) => None,
        None => Some((s, None)),
    }
}

/// An entry of `NO_PROXY` as Go's proxy rules read it (which k3s and
/// containerd use): an IP, a CIDR, a host name, or a domain with a
/// leading `.` (it and every name under it); a host or IP may carry a
/// `:port`.
pub fn parse_no_proxy(s: &str) -> Result<String, Invalid> {
    let ok = s.parse::<IpAddr>().is_ok() || s.parse::<ipnet::IpNet>().is_ok() || {
        let (host, port) = split_host_port(s).unwrap_or((s, None));
        let port_ok = port.is_none_or(|p| parse_port_str(p).is_ok());
        let name = host.strip_prefix('.').unwrap_or(host);
        port_ok && (host.parse::<IpAddr>().is_ok() || is_hostname(name))
    };
    if ok {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(invalid(
            format!("`{}` is not a NO_PROXY entry", s.escape_debug()),
            "write an IP, a CIDR, a host name, or a domain with a leading dot for every name under it (\".campus.example\"); one entry per string, no `*`",
        ))
    }
}

/// A name Kubernetes accepts for an object and k3s for the file it
/// deploys it from: one lower-case RFC 1123 label of at most `max`
/// characters (a Helm release name: 53).
pub fn parse_k8s_name(s: &str, max: usize) -> Result<String, Invalid> {
    if is_dns_label(s) && s.len() <= max && !s.bytes().any(|c| c.is_ascii_uppercase()) {
        Ok(s.to_string())
    } else {
        Err(invalid(
            format!("`{}` is not a Kubernetes name", s.escape_debug()),
            format!(
                "use at most {max} lower-case letters, digits and inner hyphens, like \"registry\""
            ),
        ))
    }
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
    fn max_ages_are_whole_days_or_hours() {
        for (text, secs) in [
            ("30d", 30 * 86400),
            ("12h", 12 * 3600),
            ("1h", 3600),
            ("3650d", 3650 * 86400),
            ("87600h", 87600 * 3600),
        ] {
            let a = MaxAge::parse(text).unwrap_or_else(|e| panic!("{text}: {e:?}"));
            assert_eq!(a.as_secs(), secs, "{text}");
            assert_eq!(a.to_string(), text, "written back as given");
        }
        assert_eq!(MaxAge::days(30), MaxAge::parse("30d").unwrap());
        for bad in [
            "",
            "30",
            "d",
            "h",
            "30 d",
            " 30d",
            "30d ",
            "30D",
            "30days",
            "1w",
            "-1d",
            "+1d",
            "1.5d",
            "030d",
            "0d",
            "0h",
            "3651d",
            "87601h",
            "1d12h",
            "99999999999999999999999d",
            "３0d",
        ] {
            assert!(MaxAge::parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(
            MaxAge::parse("0d")
                .unwrap_err()
                .hint
                .contains("--refresh-base")
        );
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

    #[test]
    fn proxy_urls() {
        for (good, shown) in [
            (
                "http://proxy.campus.example:3128",
                "http://proxy.campus.example:3128",
            ),
            ("HTTPS://10.0.0.1/", "https://10.0.0.1"),
            ("http://[2001:db8::1]:8080", "http://[2001:db8::1]:8080"),
            (
                "http://bob:s%24cret@proxy:3128",
                "http://bob:***@proxy:3128",
            ),
        ] {
            let u = ProxyUrl::parse(good).unwrap();
            assert_eq!(u.redacted(), shown, "{good}");
        }
        assert_eq!(
            ProxyUrl::parse("http://bob:s%24cret@proxy:3128")
                .unwrap()
                .to_string(),
            "http://bob:s%24cret@proxy:3128"
        );
        for (bad, why) in [
            ("proxy:3128", "no http://"),
            ("socks5://proxy:1080", "scheme `socks5`"),
            ("http://", "host"),
            ("http://proxy:0", "port"),
            ("http://proxy:3128/path", "no path"),
            ("http://bob:pa$$@proxy", "credentials"),
            ("http://bob:it's@proxy", "credentials"),
            ("http://pro xy:3128", "host"),
            ("http://999.1.1.1:3128", "IP"),
        ] {
            let e = ProxyUrl::parse(bad).unwrap_err();
            assert!(e.message.contains(why), "{bad}: {e:?}");
        }
    }

    #[test]
    fn no_proxy_entries() {
        for good in [
            "10.0.0.1",
            "10.0.0.0/8",
            "::1",
            "2001:db8::/32",
            "rgb1",
            "rgb1:5000",
            ".campus.example",
            "Git.Campus.Example",
        ] {
            assert!(parse_no_proxy(good).is_ok(), "{good}");
        }
        assert_eq!(parse_no_proxy("Git.Example").unwrap(), "git.example");
        for bad in [
            "*",
            "*.example",
            "a b",
            "a,b",
            "",
            "host:99999",
            "10.0.0.0/33",
        ] {
            assert!(parse_no_proxy(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn kubernetes_names() {
        assert!(parse_k8s_name("registry", 53).is_ok());
        assert!(parse_k8s_name("system-upgrade-controller", 53).is_ok());
        for bad in ["Registry", "-x", "x-", "a_b", "a.b", "", &"a".repeat(54)] {
            assert!(parse_k8s_name(bad, 53).is_err(), "{bad}");
        }
    }
}

//! The k3s cluster CA set that kiln holds: making it, checking it, the
//! secure join token it implies, and admin client certificates signed by
//! it. Pure: no file is read or written here (the state directory keeps
//! the set, see `config::ca_dir`; rendering seeds it on a server).
//!
//! What k3s expects (k3s docs, "k3s certificate" → "Using Custom CA
//! Certificates", and `pkg/daemons/control/deps` in k3s):
//! - The files live in `<data-dir>/server/tls` (default
//!   `/var/lib/rancher/k3s/server/tls`): `server-ca`, `client-ca`,
//!   `request-header-ca`, `etcd/peer-ca`, `etcd/server-ca` (each `.crt` and
//!   `.key`; the etcd ones are required even without embedded etcd), and
//!   `service.key`, the service-account signing key, which has no
//!   certificate.
//! - They are used only if they exist when the *first* server of the
//!   cluster starts for the first time; otherwise k3s makes its own. k3s
//!   then keeps the set in the datastore (encrypted with the token), and a
//!   joining server takes it from there. A file on a joining server's disk
//!   that differs from the datastore's copy stops k3s ("… newer than
//!   datastore and could cause a cluster outage"). So kiln seeds the set on
//!   the server that starts the cluster only (see [`seeds_ca`]): joining
//!   servers get the same files from the datastore, and fewer images carry
//!   the keys.
//! - k3s's own CAs are self-signed, ECDSA P-256, valid 10 years, named
//!   `<prefix>-ca@<unix time>` with the prefixes `k3s-server`, `k3s-client`,
//!   `k3s-request-header`, `etcd-server`, `etcd-peer`, with key usages
//!   digital signature, key encipherment and certificate signing. kiln makes
//!   the same. k3s parses PKCS#8 keys (`PRIVATE KEY`), which is what kiln
//!   writes. k3s makes `service.key` as RSA 2048 when it is missing; the
//!   API server accepts ECDSA service-account keys as well (ES256), and
//!   kiln's crypto backend makes ECDSA, so kiln's `service.key` is P-256.
//! - The secure token is `K10<CA hash>::<user>:<password>` (k3s docs,
//!   "k3s token"). For a CA file holding one certificate the hash is the
//!   SHA-256 of the file's bytes exactly as stored (`hashCA` in k3s
//!   `pkg/clientaccess/token.go`); an agent fetches `/cacerts` from the
//!   server and compares before it sends the password. So the hash is taken
//!   of the very bytes kiln seeds.
//! - k3s's admin client certificate is `CN=system:admin, O=system:masters`,
//!   signed by the client CA, valid one year; kiln's kubeconfig uses the
//!   same subject and lifetime.

use std::collections::BTreeMap;
use std::fmt;

use anyhow::{Context as _, anyhow, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use crate::config::plan::{NodePlan, Plan};
use crate::config::profile::Role;
use crate::config::types::K3sToken;

/// Validity of a CA, as k3s gives its self-signed CAs (10 × 365 days).
pub const CA_VALIDITY_DAYS: i64 = 3650;
/// Validity of an admin client certificate, as k3s gives its own.
pub const ADMIN_CERT_VALIDITY_DAYS: i64 = 365;
/// An admin certificate is valid from this long before it is made, so a
/// server whose clock is a little behind accepts it at once.
pub const ADMIN_CERT_BACKDATE_MINUTES: i64 = 5;
/// The admin user k3s itself writes into its kubeconfig.
pub const ADMIN_CN: &str = "system:admin";
/// The group Kubernetes binds to `cluster-admin`.
pub const ADMIN_ORG: &str = "system:masters";
/// Random bytes in a certificate serial number (RFC 5280 allows 20).
const SERIAL_BYTES: usize = 16;

/// The five CAs k3s reads from `server/tls`: the path stem under it and
/// the common-name prefix k3s gives its own.
pub const CAS: [(&str, &str); 5] = [
    ("server-ca", "k3s-server"),
    ("client-ca", "k3s-client"),
    ("request-header-ca", "k3s-request-header"),
    ("etcd/peer-ca", "etcd-peer"),
    ("etcd/server-ca", "etcd-server"),
];
/// The service-account signing key (no certificate).
pub const SERVICE_KEY: &str = "service.key";
/// The server CA certificate, whose hash is in the join token.
pub const SERVER_CA_CRT: &str = "server-ca.crt";
const CLIENT_CA_CRT: &str = "client-ca.crt";
const CLIENT_CA_KEY: &str = "client-ca.key";

/// Every file of the set, relative to `server/tls`, in a fixed order.
pub fn file_names() -> Vec<String> {
    let mut v: Vec<String> = CAS
        .iter()
        .flat_map(|(stem, _)| [format!("{stem}.crt"), format!("{stem}.key")])
        .collect();
    v.push(SERVICE_KEY.to_string());
    v
}

/// Is a file of the set a private key (mode 0600 on the node)?
pub fn is_key(name: &str) -> bool {
    name.ends_with(".key")
}

/// Does this node get the CA set in its seed? Only the server that
/// starts the cluster (see the module doc): joining servers get it from
/// the datastore, agents never hold a CA key.
pub fn seeds_ca(plan: &Plan, node: &NodePlan) -> bool {
    node.role == Role::Server && plan.join_url(node).is_none()
}

/// The CA set: PEM text by file name (relative to `server/tls`). Its
/// `Debug` names the files and the server CA hash, never a key.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterCa {
    files: BTreeMap<String, String>,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ClusterCa(<keys redacted>, server CA hash {}, files {:?})",
            self.server_ca_hash(),
            self.files.keys().collect::<Vec<_>>()
        )
    }
}

/// A client certificate and its key, PEM.
pub struct ClientCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for ClientCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientCert(<key redacted>)")
    }
}

fn serial() -> anyhow::Result<SerialNumber> {
    let mut b = [0u8; SERIAL_BYTES];
    getrandom::fill(&mut b).map_err(|e| anyhow!("reading random bytes: {e}"))?;
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // and no leading zero byte to strip
    Ok(SerialNumber::from_slice(&b))
}

fn new_key() -> anyhow::Result<KeyPair> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generating an ECDSA P-256 key")
}

/// A self-signed CA certificate as k3s makes one.
fn make_ca(cn: &str, key: &KeyPair, now: OffsetDateTime) -> anyhow::Result<String> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
        KeyUsagePurpose::KeyCertSign,
    ];
    p.not_before = now;
    p.not_after = now + Duration::days(CA_VALIDITY_DAYS);
    p.serial_number = Some(serial()?);
    let cert = p
        .self_signed(key)
        .with_context(|| format!("signing CA {cn}"))?;
    Ok(cert.pem())
}

impl ClusterCa {
    /// A new set: five CAs and a service-account key, made at `now`.
    pub fn generate(now: OffsetDateTime) -> anyhow::Result<Self> {
        let mut files = BTreeMap::new();
        for (stem, prefix) in CAS {
            let key = new_key()?;
            let cn = format!("{prefix}-ca@{}", now.unix_timestamp());
            files.insert(format!("{stem}.crt"), make_ca(&cn, &key, now)?);
            files.insert(format!("{stem}.key"), key.serialize_pem());
        }
        files.insert(SERVICE_KEY.to_string(), new_key()?.serialize_pem());
        Ok(ClusterCa { files })
    }

    /// A set read back from files (name → text). Refuses a set with a
    /// file missing, a certificate or key kiln cannot read, or a key that
    /// does not belong to its certificate; the error names the file.
    pub fn from_files(mut files: BTreeMap<String, String>) -> anyhow::Result<Self> {
        files.retain(|name, _| file_names().contains(name));
        for name in file_names() {
            if !files.contains_key(&name) {
                bail!("{name} is missing");
            }
        }
        for (stem, _) in CAS {
            check_pair(&files, stem)?;
        }
        KeyPair::from_pem(&files[SERVICE_KEY])
            .map_err(|e| anyhow!("{SERVICE_KEY} is not an unencrypted PKCS#8 private key ({e}); convert the one k3s made (PKCS#1 RSA) with `openssl pkcs8 -topk8 -nocrypt`"))?;
        Ok(ClusterCa { files })
    }

    /// Every file: name (relative to `server/tls`) and content.
    pub fn files(&self) -> impl Iterator<Item = (&str, &str)> {
        self.files.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The server CA certificate, PEM, exactly as stored and seeded.
    pub fn server_ca_pem(&self) -> &str {
        &self.files[SERVER_CA_CRT]
    }

    /// The client CA certificate, PEM.
    pub fn client_ca_pem(&self) -> &str {
        &self.files[CLIENT_CA_CRT]
    }

    /// The CA hash of the secure token: SHA-256 of the server CA file.
    pub fn server_ca_hash(&self) -> String {
        ca_hash(self.server_ca_pem().as_bytes())
    }

    /// An admin client certificate (`CN=system:admin, O=system:masters`)
    /// with a new key, signed by the client CA, valid from shortly before
    /// `now` for [`ADMIN_CERT_VALIDITY_DAYS`].
    pub fn issue_admin(&self, now: OffsetDateTime) -> anyhow::Result<ClientCert> {
        let ca_key =
            KeyPair::from_pem(&self.files[CLIENT_CA_KEY]).context("reading the client CA key")?;
        let issuer = Issuer::from_ca_cert_pem(self.client_ca_pem(), ca_key)
            .context("reading the client CA certificate")?;
        let key = new_key()?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, ADMIN_ORG);
        dn.push(DnType::CommonName, ADMIN_CN);
        p.distinguished_name = dn;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.use_authority_key_identifier_extension = true;
        p.not_before = now - Duration::minutes(ADMIN_CERT_BACKDATE_MINUTES);
        p.not_after = now + Duration::days(ADMIN_CERT_VALIDITY_DAYS);
        p.serial_number = Some(serial()?);
        let cert = p
            .signed_by(&key, &issuer)
            .context("signing the admin client certificate")?;
        Ok(ClientCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Check that a CA's certificate and key parse and belong together.
fn check_pair(files: &BTreeMap<String, String>, stem: &str) -> anyhow::Result<()> {
    let (crt, key) = (format!("{stem}.crt"), format!("{stem}.key"));
    let pair = KeyPair::from_pem(&files[&key]).map_err(|e| {
        anyhow!("{key} is not an unencrypted PKCS#8 private key ({e}); convert one made by k3s or openssl with `openssl pkcs8 -topk8 -nocrypt`")
    })?;
    let blocks = files[&crt].matches("-----BEGIN CERTIFICATE-----").count();
    if blocks != 1 {
        // k3s hashes a bundle's root certificate (DER), not the file, for
        // the token; kiln supports one self-signed CA per file.
        bail!(
            "{crt} holds {blocks} certificates; kiln keeps one self-signed CA certificate per file (a chain with intermediates is not supported)"
        );
    }
    let der = pem_der(&files[&crt]).with_context(|| format!("{crt} is not a PEM certificate"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| anyhow!("{crt} is not an X.509 certificate ({e})"))?;
    if cert.public_key().subject_public_key.data.as_ref() != pair.public_key_raw() {
        bail!("{key} is not the key of {crt}");
    }
    if !cert.is_ca() {
        bail!("{crt} is not a CA certificate");
    }
    if cert.subject() != cert.issuer() {
        bail!(
            "{crt} is not self-signed (issuer {}); kiln keeps a root CA per file",
            cert.issuer()
        );
    }
    Ok(())
}

/// The DER of the first PEM block of `text`.
fn pem_der(text: &str) -> anyhow::Result<Vec<u8>> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(text.as_bytes())
        .map_err(|e| anyhow!("no PEM block ({e})"))?;
    Ok(pem.contents)
}

/// The CA hash k3s puts in a secure token, for a CA file holding one
/// certificate: the hex SHA-256 of the file's bytes.
pub fn ca_hash(file: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(file))
}

/// The secure token: `K10<ca hash>::server:<secret>`.
pub fn secure_token(ca_hash: &str, secret: &str) -> K3sToken {
    K3sToken::new(format!("K10{ca_hash}::server:{secret}"))
}

/// A token in the secure form, split: the CA hash and the credentials
/// (`server:<secret>`, or whatever follows the `::`). `None` for a token
/// that does not start with `K10`.
pub fn split_secure(token: &str) -> Option<(&str, &str)> {
    token.strip_prefix("K10")?.split_once("::")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_790_000_000).unwrap()
    }

    #[test]
    fn a_new_set_has_every_file_and_reads_back() {
        let ca = ClusterCa::generate(now()).unwrap();
        let names: Vec<&str> = ca.files().map(|(n, _)| n).collect();
        let mut expected = file_names();
        expected.sort();
        assert_eq!(names, expected);
        let again = ClusterCa::from_files(
            ca.files()
                .map(|(n, t)| (n.to_string(), t.to_string()))
                .collect(),
        )
        .unwrap();
        assert_eq!(again, ca);
        assert_eq!(ca.server_ca_hash().len(), 64);
    }

    #[test]
    fn a_swapped_or_missing_file_is_named() {
        let ca = ClusterCa::generate(now()).unwrap();
        let mut files: BTreeMap<String, String> = ca
            .files()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect();
        let client_key = files["client-ca.key"].clone();
        files.insert("server-ca.key".into(), client_key);
        let err = ClusterCa::from_files(files.clone())
            .unwrap_err()
            .to_string();
        assert!(err.contains("server-ca.key"), "{err}");
        files.remove("etcd/peer-ca.crt");
        let err = ClusterCa::from_files(files).unwrap_err().to_string();
        assert!(err.contains("etcd/peer-ca.crt is missing"), "{err}");
    }

    #[test]
    fn debug_does_not_print_keys() {
        let ca = ClusterCa::generate(now()).unwrap();
        let debug = format!("{ca:?}");
        for (name, text) in ca.files() {
            if is_key(name) {
                let body: Vec<&str> = text.lines().filter(|l| !l.starts_with("-----")).collect();
                assert!(body.iter().all(|l| !debug.contains(l)), "{debug}");
            }
        }
        let admin = ca.issue_admin(now()).unwrap();
        assert!(!format!("{admin:?}").contains(&admin.key_pem[30..60]));
    }

    #[test]
    fn secure_tokens_split_back() {
        let t = secure_token("ab12", "s3cret");
        assert_eq!(t.expose(), "K10ab12::server:s3cret");
        assert_eq!(split_secure(t.expose()), Some(("ab12", "server:s3cret")));
        assert_eq!(split_secure("plain-token-0123456789"), None);
    }
}

//! The double's TLS, shaped on what k3s does with the files in
//! `server/tls` and with the token (facts from the k3s documentation on
//! custom CA certificates and on tokens):
//!
//! - A server uses the CA files it finds in `server/tls` before its first
//!   start and makes the missing ones itself. A CA certificate without its
//!   key is an error (k3s cannot sign with it). The double signs a serving
//!   certificate for the supervisor/API port 6443 with the server CA, for
//!   the names k3s puts in it (`tls-san`, `node-ip`, `advertise-address`,
//!   localhost, 127.0.0.1, kubernetes).
//! - The port answers `GET /cacerts` with the server CA file and
//!   `GET /ping` to anyone, as k3s does; any other path only to a client
//!   whose certificate the client CA signed (else 401): `/version` with
//!   `{"gitVersion":…}`, the rest with a banner.
//! - A token in the secure form `K10<sha256 of the CA file>::user:secret`
//!   pins the server CA: a server refuses to start if its own CA does not
//!   match; an agent fetches `/cacerts` without verifying, refuses a server
//!   whose CA does not match, then talks to it verifying its certificate
//!   with that CA. A short token pins nothing: the agent trusts what
//!   `/cacerts` returned.
//!
//! The double reads keys in PKCS#8 (`PRIVATE KEY`) only; k3s also reads
//! SEC1 (`EC PRIVATE KEY`). The difference would show as a clear failure.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sha2::Digest as _;

pub const TLS_DIR: &str = "/var/lib/rancher/k3s/server/tls";

/// The CA pairs k3s reads from `server/tls` (relative to it).
pub const CA_PAIRS: [&str; 5] = [
    "server-ca",
    "client-ca",
    "request-header-ca",
    "etcd/server-ca",
    "etcd/peer-ca",
];

pub fn sha256_hex(b: &[u8]) -> String {
    sha2::Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// The CA hash of a secure token (`K10<hash>::…`), if it is one.
pub fn token_ca_hash(token: &str) -> Option<&str> {
    let rest = token.strip_prefix("K10")?;
    let (hash, _) = rest.split_once("::")?;
    (hash.len() == 64).then_some(hash)
}

/// Where the CA set came from, for the record.
pub struct CaSet {
    pub origin: String,
    pub server_ca_pem: String,
    server_key: rcgen::KeyPair,
    client_ca: Vec<CertificateDer<'static>>,
}

/// Read the CA set k3s would use, making the missing pairs as k3s does
/// (a pair with a certificate but no key is refused).
pub fn load_or_make_cas() -> Result<CaSet, String> {
    let mut found = Vec::new();
    let mut made = Vec::new();
    for name in CA_PAIRS {
        let crt = format!("{TLS_DIR}/{name}.crt");
        let key = format!("{TLS_DIR}/{name}.key");
        match (Path::new(&crt).exists(), Path::new(&key).exists()) {
            (true, true) => found.push(name),
            (true, false) => {
                return Err(format!(
                    "{crt} exists but {key} does not: cannot sign with a CA certificate without its key"
                ));
            }
            (false, true) => return Err(format!("{key} exists but {crt} does not")),
            (false, false) => {
                make_ca(name, &crt, &key)?;
                made.push(name);
            }
        }
    }
    let read = |p: &str| std::fs::read_to_string(p).map_err(|e| format!("reading {p}: {e}"));
    let server_ca_pem = read(&format!("{TLS_DIR}/server-ca.crt"))?;
    let key_path = format!("{TLS_DIR}/server-ca.key");
    let server_key = rcgen::KeyPair::from_pem(&read(&key_path)?)
        .map_err(|e| format!("{key_path}: not a PKCS#8 key the double reads: {e}"))?;
    let client_path = format!("{TLS_DIR}/client-ca.crt");
    let client_ca = CertificateDer::pem_file_iter(&client_path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{client_path}: {e}"))?;
    Ok(CaSet {
        origin: format!("found={} made={}", found.join(","), made.join(",")),
        server_ca_pem,
        server_key,
        client_ca,
    })
}

fn make_ca(name: &str, crt: &str, key: &str) -> Result<(), String> {
    let pair = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let mut p = rcgen::CertificateParams::default();
    let cn = format!("k3s-{}@double", name.replace('/', "-"));
    p.distinguished_name
        .push(rcgen::DnType::CommonName, cn.as_str());
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let cert = p.self_signed(&pair).map_err(|e| e.to_string())?;
    if let Some(dir) = Path::new(crt).parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    std::fs::write(key, pair.serialize_pem()).map_err(|e| format!("writing {key}: {e}"))?;
    std::fs::write(crt, cert.pem()).map_err(|e| format!("writing {crt}: {e}"))
}

/// The names k3s puts in its serving certificate, from config.yaml.
pub fn serving_names(config: &str) -> Vec<String> {
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "kubernetes".into()];
    let mut in_san = false;
    for l in config.lines() {
        if in_san {
            if let Some(v) = l.strip_prefix("- ") {
                names.push(v.trim().trim_matches('"').to_string());
                continue;
            }
            in_san = false;
        }
        if l.starts_with("tls-san:") {
            in_san = true;
        }
        for k in ["node-ip:", "advertise-address:"] {
            if let Some(v) = l.strip_prefix(k) {
                names.extend(v.split(',').map(|s| s.trim().trim_matches('"').to_string()));
            }
        }
    }
    names.retain(|n| !n.is_empty());
    names.sort();
    names.dedup();
    names
}

/// The server's TLS: a serving certificate signed by the server CA;
/// client certificates optional, and verified against the client CA.
pub fn server_config(cas: &CaSet, names: Vec<String>) -> Result<Arc<rustls::ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let issuer = rcgen::Issuer::from_ca_cert_pem(&cas.server_ca_pem, &cas.server_key)
        .map_err(|e| format!("server-ca.crt: {e}"))?;
    let leaf_key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let mut p = rcgen::CertificateParams::new(names).map_err(|e| e.to_string())?;
    p.distinguished_name.push(rcgen::DnType::CommonName, "k3s");
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = p
        .signed_by(&leaf_key, &issuer)
        .map_err(|e| format!("signing the serving certificate: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in &cas.client_ca {
        roots
            .add(c.clone())
            .map_err(|e| format!("client-ca.crt: {e}"))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| format!("client verifier: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(leaf_key.serialize_pem().as_bytes())
        .map_err(|e| e.to_string())?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![leaf.der().clone()], key)
        .map_err(|e| e.to_string())?;
    Ok(Arc::new(config))
}

/// Answer one connection (see the module doc). Returns what was asked and
/// answered, for the record.
pub fn serve(
    cfg: Arc<rustls::ServerConfig>,
    sock: TcpStream,
    ca_pem: &str,
    banner: &str,
) -> String {
    let _ = sock.set_read_timeout(Some(std::time::Duration::from_secs(10)));
    let Ok(conn) = rustls::ServerConnection::new(cfg) else {
        return "tls setup failed".into();
    };
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let mut line = String::new();
    {
        let mut r = BufReader::new(&mut tls);
        if let Err(e) = r.read_line(&mut line) {
            return format!("handshake or read failed: {e}");
        }
        // Drain the headers.
        let mut h = String::new();
        while r.read_line(&mut h).is_ok_and(|n| n > 2) {
            h.clear();
        }
    }
    let client = tls.conn.peer_certificates().is_some_and(|c| !c.is_empty());
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (status, body) = match path.as_str() {
        "/cacerts" => ("200 OK", ca_pem.to_string()),
        "/ping" => ("200 OK", format!("{banner}\n")),
        _ if !client => ("401 Unauthorized", "client certificate required\n".into()),
        // As k3s: the version alone (the banner is "k3s-double VERSION").
        "/version" => (
            "200 OK",
            format!(
                "{{\"gitVersion\":\"{}\"}}\n",
                banner.rsplit(' ').next().unwrap_or(banner)
            ),
        ),
        _ => ("200 OK", format!("{banner}\n")),
    };
    let _ = write!(
        tls,
        "HTTP/1.0 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tls.flush();
    tls.conn.send_close_notify();
    let _ = tls.flush();
    format!("{path} {status} client_cert={client}")
}

/// Accepts any server certificate: only for fetching `/cacerts`, whose
/// answer is then checked against the token's hash, as k3s's agent does.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// GET `path` from `host:port` over TLS; `ca` None accepts any server
/// certificate, Some verifies the server with it (and its name, `host`).
pub fn get(target: &str, path: &str, ca: Option<&[u8]>) -> Result<String, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let config = match ca {
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
            .with_no_client_auth(),
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(pem) {
                roots
                    .add(c.map_err(|e| format!("CA from /cacerts: {e}"))?)
                    .map_err(|e| format!("CA from /cacerts: {e}"))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    let host = target.rsplit_once(':').map_or(target, |(h, _)| h);
    let name = ServerName::try_from(host.to_string()).map_err(|e| format!("{host}: {e}"))?;
    let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    let addr = std::net::ToSocketAddrs::to_socket_addrs(target)
        .map_err(|e| format!("{target}: {e}"))?
        .next()
        .ok_or_else(|| format!("{target}: no address"))?;
    let sock = TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(3))
        .map_err(|e| e.to_string())?;
    let _ = sock.set_read_timeout(Some(std::time::Duration::from_secs(5)));
    let mut tls = rustls::StreamOwned::new(conn, sock);
    write!(tls, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut resp = Vec::new();
    match tls.read_to_end(&mut resp) {
        Ok(_) => {}
        // A peer that closes without close_notify still gave its answer.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !resp.is_empty() => {}
        Err(e) => return Err(e.to_string()),
    }
    let resp = String::from_utf8_lossy(&resp).to_string();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    if !head.starts_with("HTTP/1.0 200") {
        return Err(format!("{path}: {}", head.lines().next().unwrap_or("")));
    }
    Ok(body.to_string())
}

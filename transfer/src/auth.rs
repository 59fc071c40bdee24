//! Authentication: who may talk to whom.
//!
//! Every cluster has one CA. Each node serves a certificate the CA signed,
//! and a client verifies the server's chain against the CA it *pins by
//! fingerprint*. Clients authenticate in one of two ways:
//!
//! - **Join token** (the default): `ferry1-<CA fingerprint>-<secret>`. The
//!   leader creates the CA and secret on first start and prints the token.
//!   The client proves it knows the secret with a keyed blake3 hash over TLS
//!   keying material exported from *this* session, so the secret never
//!   crosses the wire and a proof cannot be replayed on another connection.
//! - **Operator certificates**: a client certificate signed by the cluster CA
//!   (mutual TLS). `ferry certs` creates a CA and issues node certificates.
//!
//! The server also checks that the client names the same cluster (the CA
//! fingerprint) in its `Hello`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::protocol::ALPN;

/// The DNS name every ferry node certificate carries and every client asks for.
pub const SERVER_NAME: &str = "ferry";
const EXPORTER_LABEL: &[u8] = b"EXPORTER-ferry-join-proof";
const PROOF_CONTEXT: &str = "ferry 2026 join-token proof v1";

/// A CA fingerprint: blake3 of its DER encoding. It names the cluster.
pub type Fingerprint = [u8; 32];

/// Errors of certificate handling and TLS setup.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A certificate could not be generated or parsed.
    #[error("certificate error: {0}")]
    Cert(String),
    /// A file could not be read or written.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The join token is not of the form `ferry1-<64 hex>-<64 hex>`.
    #[error("invalid join token: {0}")]
    BadToken(&'static str),
    /// rustls refused the configuration.
    #[error("tls configuration: {0}")]
    Tls(String),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> AuthError + 'a {
    move |source| AuthError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The join token: the CA's fingerprint, the join secret and, in tokens a
/// leader prints (`ferry2-`), the fingerprint of the leader's own key, so a
/// joining node talks to that leader and not to any node the CA signed.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub ca: Fingerprint,
    pub secret: [u8; 32],
    /// blake3 of the leader's SubjectPublicKeyInfo (stable across its
    /// certificate renewals, which keep the key).
    pub leader: Option<Fingerprint>,
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.leader {
            Some(l) => write!(
                f,
                "ferry2-{}-{}-{}",
                hex::encode(self.ca),
                hex::encode(l),
                hex::encode(self.secret)
            ),
            None => write!(
                f,
                "ferry1-{}-{}",
                hex::encode(self.ca),
                hex::encode(self.secret)
            ),
        }
    }
}

/// blake3 of a certificate's SubjectPublicKeyInfo: the identity a token
/// pins.
pub fn key_fingerprint(der: &CertificateDer<'_>) -> Result<Fingerprint, AuthError> {
    let (_, x) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(cert_err)?;
    Ok(*blake3::hash(x.public_key().raw).as_bytes())
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        write!(
            f,
            "JoinToken(ca={}, secret=<redacted>)",
            hex::encode(&self.ca[..8])
        )
    }
}

impl FromStr for JoinToken {
    type Err = AuthError;
    fn from_str(s: &str) -> Result<Self, AuthError> {
        let parse = |h: &str| -> Result<[u8; 32], AuthError> {
            hex::decode(h)
                .ok()
                .and_then(|v| v.try_into().ok())
                .ok_or(AuthError::BadToken("expected 64 hex digits"))
        };
        let s = s.trim();
        if let Some(rest) = s.strip_prefix("ferry2-") {
            let mut parts = rest.split('-');
            let (Some(ca), Some(leader), Some(secret), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(AuthError::BadToken("a ferry2 token has three parts"));
            };
            return Ok(Self {
                ca: parse(ca)?,
                leader: Some(parse(leader)?),
                secret: parse(secret)?,
            });
        }
        let rest = s
            .strip_prefix("ferry1-")
            .ok_or(AuthError::BadToken("it must start with ferry2- or ferry1-"))?;
        let (ca, secret) = rest
            .split_once('-')
            .ok_or(AuthError::BadToken("missing secret"))?;
        Ok(Self {
            ca: parse(ca)?,
            secret: parse(secret)?,
            leader: None,
        })
    }
}

/// The proof a client sends in `Hello`: a keyed hash of the session's
/// exported keying material and its node id.
pub fn join_proof(secret: &[u8; 32], exported: &[u8; 32], node_id: &str) -> [u8; 32] {
    let key = blake3::derive_key(PROOF_CONTEXT, secret);
    let mut h = blake3::Hasher::new_keyed(&key);
    h.update(exported);
    h.update(node_id.as_bytes());
    *h.finalize().as_bytes()
}

/// Checks a proof in constant time.
pub fn check_proof(
    secret: &[u8; 32],
    exported: &[u8; 32],
    node_id: &str,
    proof: &[u8; 32],
) -> bool {
    blake3::Hash::from(join_proof(secret, exported, node_id)) == blake3::Hash::from(*proof)
}

/// Keying material both ends of a connection derive from its TLS session.
pub fn exported_keying_material(conn: &quinn::Connection) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, EXPORTER_LABEL, b"")
        .ok()?;
    Some(out)
}

/// A certificate and its private key, PEM-encoded.
#[derive(Clone)]
pub struct CertKey {
    pub cert_pem: String,
    pub key_pem: String,
}

/// How long a certificate issued to a node stays valid by default. Nodes
/// renew theirs when a third of the lifetime is left, so a stolen or
/// revoked certificate is useless within this time even where the
/// revocation list does not reach.
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A certificate's validity, in Unix seconds: (not before, not after).
pub fn validity(der: &CertificateDer<'_>) -> Result<(i64, i64), AuthError> {
    let (_, x) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(cert_err)?;
    let v = x.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// The common name of a certificate's subject: the node name ferry issued
/// it for.
pub fn common_name(der: &CertificateDer<'_>) -> Option<String> {
    let (_, x) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let cn = x.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// Whether a certificate valid over `(not_before, not_after)` should be
/// renewed at `now`: a third of its lifetime or less is left.
pub fn renewal_due((not_before, not_after): (i64, i64), now: i64) -> bool {
    now >= not_after - (not_after - not_before).max(0) / 3
}

/// The cluster CA.
pub struct ClusterCa {
    pub cert_pem: String,
    key_pem: String,
}

impl ClusterCa {
    /// Generates a new CA.
    pub fn generate(name: &str) -> Result<Self, AuthError> {
        let key = rcgen::KeyPair::generate().map_err(cert_err)?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).map_err(cert_err)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Loads a CA from PEM files.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, AuthError> {
        Ok(Self {
            cert_pem: std::fs::read_to_string(cert).map_err(io_err("read", cert))?,
            key_pem: std::fs::read_to_string(key).map_err(io_err("read", key))?,
        })
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    pub fn fingerprint(&self) -> Result<Fingerprint, AuthError> {
        Ok(fingerprint(&pem_certs(&self.cert_pem)?[0]))
    }

    /// Issues a certificate for a node, valid as server and client for
    /// `lifetime`.
    pub fn issue(&self, node_name: &str, lifetime: Duration) -> Result<CertKey, AuthError> {
        let ca = issuer(&self.cert_pem, &self.key_pem)?;
        let key = rcgen::KeyPair::generate().map_err(cert_err)?;
        let params = node_cert_params(node_name, lifetime)?;
        let cert = params.signed_by(&key, &ca).map_err(cert_err)?;
        Ok(CertKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// The CA as an rcgen issuer, from its certificate and key.
fn issuer(
    cert_pem: &str,
    key_pem: &str,
) -> Result<rcgen::Issuer<'static, rcgen::KeyPair>, AuthError> {
    let key = rcgen::KeyPair::from_pem(key_pem).map_err(cert_err)?;
    rcgen::Issuer::from_ca_cert_pem(cert_pem, key).map_err(cert_err)
}

/// What every node certificate says: the name `ferry` (and `localhost`),
/// server and client use, the node's name as common name, valid for
/// `lifetime` from now, and from a little before (clock skew: five minutes,
/// or a tenth of a shorter lifetime).
fn node_cert_params(
    node_name: &str,
    lifetime: Duration,
) -> Result<rcgen::CertificateParams, AuthError> {
    let mut params =
        rcgen::CertificateParams::new(vec![SERVER_NAME.to_owned(), "localhost".to_owned()])
            .map_err(cert_err)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, node_name);
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    let at = |secs: i64| time::OffsetDateTime::from_unix_timestamp(secs).map_err(cert_err);
    let now = unix_now();
    let skew = (lifetime.as_secs() / 10).min(300) as i64;
    params.not_before = at(now - skew)?;
    params.not_after = at(now.saturating_add(lifetime.as_secs().min(100 * 365 * 86_400) as i64))?;
    Ok(params)
}

fn cert_err(e: impl fmt::Display) -> AuthError {
    AuthError::Cert(e.to_string())
}

/// blake3 of a certificate's DER encoding.
pub fn fingerprint(der: &CertificateDer<'_>) -> Fingerprint {
    *blake3::hash(der.as_ref()).as_bytes()
}

/// Parses every certificate in a PEM string.
pub fn pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, AuthError> {
    let certs: Vec<_> = ::pem::parse_many(pem)
        .map_err(cert_err)?
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| CertificateDer::from(p.into_contents()))
        .collect();
    if certs.is_empty() {
        return Err(AuthError::Cert("no certificate in PEM".into()));
    }
    Ok(certs)
}

fn pem_key(pem: &str) -> Result<PrivateKeyDer<'static>, AuthError> {
    let p = ::pem::parse_many(pem)
        .map_err(cert_err)?
        .into_iter()
        .find(|p| p.tag() == "PRIVATE KEY")
        .ok_or_else(|| AuthError::Cert("no PKCS#8 PRIVATE KEY in PEM".into()))?;
    Ok(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        p.into_contents(),
    )))
}

/// A node's TLS identity: its certificate (signed by the cluster CA), key,
/// the CA, and how it authenticates clients.
#[derive(Clone)]
pub struct NodeAuth {
    pub ca: CertificateDer<'static>,
    pub chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    /// The join secret, when clients may join with a token.
    pub secret: Option<[u8; 32]>,
    /// Whether this node presents its certificate as a client too
    /// (operator-certificate mode).
    pub client_cert: bool,
    /// The CA's private key (PEM), on the node that created the cluster:
    /// it signs the certificates of followers that join with the token.
    ca_key: Option<Arc<String>>,
    /// Where the join secret lives, so a rotation (`ferry token --rotate`)
    /// takes effect on a running node.
    secret_file: Option<PathBuf>,
    /// The identity directory this was loaded from (where `revoked` and a
    /// renewed `node.pem` live).
    dir: Option<PathBuf>,
    /// How long the certificates this node signs stay valid.
    cert_lifetime: Duration,
}

impl fmt::Debug for NodeAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeAuth")
            .field("cluster", &hex::encode(&self.cluster()[..8]))
            .finish_non_exhaustive()
    }
}

impl NodeAuth {
    /// From operator-provided PEM files: the CA, this node's certificate and key.
    pub fn from_files(ca: &Path, cert: &Path, key: &Path) -> Result<Self, AuthError> {
        let ca = pem_certs(&std::fs::read_to_string(ca).map_err(io_err("read", ca))?)?.remove(0);
        let mut chain = pem_certs(&std::fs::read_to_string(cert).map_err(io_err("read", cert))?)?;
        let key = pem_key(&std::fs::read_to_string(key).map_err(io_err("read", key))?)?;
        if !chain.iter().any(|c| c == &ca) {
            chain.push(ca.clone());
        }
        Ok(Self {
            ca,
            chain,
            key: Arc::new(key),
            secret: None,
            client_cert: true,
            ca_key: None,
            secret_file: None,
            dir: None,
            cert_lifetime: DEFAULT_CERT_LIFETIME,
        })
    }

    /// Sets how long the certificates this node signs stay valid.
    pub fn set_cert_lifetime(&mut self, lifetime: Duration) {
        self.cert_lifetime = lifetime;
    }

    /// This node's certificate's validity, in Unix seconds.
    pub fn validity(&self) -> Result<(i64, i64), AuthError> {
        validity(&self.chain[0])
    }

    /// Whether this node's certificate should be renewed now (a third of
    /// its lifetime or less is left). Never for operator certificates,
    /// which ferry did not issue.
    pub fn renewal_due(&self) -> bool {
        self.dir.is_some() && self.validity().is_ok_and(|v| renewal_due(v, unix_now()))
    }

    /// Whether this node's certificate outlives the lifetime this node now
    /// issues (it was issued under a longer one): re-issue it at once.
    pub fn outlives_lifetime(&self) -> bool {
        let limit = self.cert_lifetime.as_secs().saturating_add(60) as i64;
        self.dir.is_some() && self.validity().is_ok_and(|(_, na)| na - unix_now() > limit)
    }

    /// Whether the node named `name` was revoked here (`ferry revoke`).
    /// Read at every check, so a revocation takes effect on a running node.
    pub fn is_revoked(&self, name: &str) -> bool {
        let Some(dir) = &self.dir else {
            return false;
        };
        std::fs::read_to_string(dir.join(REVOKED_FILE))
            .map(|s| s.lines().any(|l| l.trim() == name))
            .unwrap_or(false)
    }

    /// Revokes the node named `name` in the identity directory `dir`: the
    /// leader refuses its connections, its renewals and its enrollment
    /// from then on, and closes the ones it has.
    pub fn revoke(dir: &Path, name: &str) -> Result<(), AuthError> {
        let path = dir.join(REVOKED_FILE);
        let mut text = std::fs::read_to_string(&path).unwrap_or_default();
        if text.lines().any(|l| l.trim() == name) {
            return Ok(());
        }
        text.push_str(name);
        text.push('\n');
        write_replace(&path, text.as_bytes())
    }

    /// On the node that holds the CA key: re-issues its own certificate
    /// (same key, new validity) and saves it. Returns the renewed identity.
    pub fn renew_own(&self, node_name: &str) -> Result<NodeAuth, AuthError> {
        let (dir, ca_key) = match (&self.dir, &self.ca_key) {
            (Some(d), Some(k)) => (d, k),
            _ => {
                return Err(AuthError::Cert(
                    "this node cannot sign its own certificate".into(),
                ))
            }
        };
        let key_pem = std::fs::read_to_string(dir.join("node.key"))
            .map_err(io_err("read", &dir.join("node.key")))?;
        let key = rcgen::KeyPair::from_pem(&key_pem).map_err(cert_err)?;
        let ca = issuer(&self.ca_pem(), ca_key)?;
        let cert = node_cert_params(node_name, self.cert_lifetime)?
            .signed_by(&key, &ca)
            .map_err(cert_err)?;
        write_replace(&dir.join("node.pem"), cert.pem().as_bytes())?;
        let mut auth = NodeAuth::load_dir(dir)?
            .ok_or_else(|| AuthError::Cert("identity vanished while renewed".into()))?;
        auth.cert_lifetime = self.cert_lifetime;
        Ok(auth)
    }

    /// Loads an identity directory (`ca.pem`, `node.pem`, `node.key`, and
    /// optionally `join-secret` and `ca.key`); `None` if it holds none yet.
    pub fn load_dir(dir: &Path) -> Result<Option<Self>, AuthError> {
        let (ca_pem, node_pem, node_key) = (
            dir.join("ca.pem"),
            dir.join("node.pem"),
            dir.join("node.key"),
        );
        if !ca_pem.exists() || !node_pem.exists() || !node_key.exists() {
            return Ok(None);
        }
        let mut auth = Self::from_files(&ca_pem, &node_pem, &node_key)?;
        let secret = dir.join("join-secret");
        if secret.exists() {
            let s = std::fs::read_to_string(&secret).map_err(io_err("read", &secret))?;
            let s: [u8; 32] = hex::decode(s.trim())
                .ok()
                .and_then(|v| v.try_into().ok())
                .ok_or(AuthError::BadToken("corrupt join-secret file"))?;
            auth.secret = Some(s);
            auth.secret_file = Some(secret);
        }
        let ca_key = dir.join("ca.key");
        if ca_key.exists() {
            auth.ca_key = Some(Arc::new(
                std::fs::read_to_string(&ca_key).map_err(io_err("read", &ca_key))?,
            ));
        }
        // An enrolled node authenticates with its certificate, so a rotated
        // join secret does not lock it out and a revocation names it.
        auth.client_cert = true;
        auth.dir = Some(dir.to_owned());
        Ok(Some(auth))
    }

    /// The key of this node's QUIC stateless resets, derived from its
    /// private key so that it survives a restart: a peer whose connection
    /// this node forgot (it crashed and came back) gets a reset it can
    /// recognise, and reconnects at once instead of waiting for its idle
    /// timeout.
    pub fn reset_key(&self) -> [u8; 32] {
        blake3::derive_key(
            "ferry 2026-11 QUIC stateless reset key",
            self.key.secret_der(),
        )
    }

    /// The join secret in force now: re-read from its file, so a rotation
    /// applies to the next `Hello` without a restart.
    pub fn current_secret(&self) -> Option<[u8; 32]> {
        let Some(path) = &self.secret_file else {
            return self.secret;
        };
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| hex::decode(s.trim()).ok())
            .and_then(|v| v.try_into().ok())
            .or(self.secret)
    }

    /// Replaces the join secret in `dir` with a new random one and returns
    /// the new token: the old token no longer admits anyone (nodes already
    /// enrolled keep their certificates).
    pub fn rotate_secret(dir: &Path) -> Result<JoinToken, AuthError> {
        let auth = Self::load_dir(dir)?
            .ok_or_else(|| AuthError::Cert(format!("no identity in {}", dir.display())))?;
        if auth.secret.is_none() {
            return Err(AuthError::BadToken("this node holds no join secret"));
        }
        let mut s = [0u8; 32];
        rand::Rng::fill(&mut rand::rng(), &mut s);
        write_replace(&dir.join("join-secret"), hex::encode(s).as_bytes())?;
        let mut token = auth.token().ok_or(AuthError::BadToken("no join secret"))?;
        token.secret = s;
        Ok(token)
    }

    /// The token that admits nodes here, when this node holds the secret. On the node that holds the CA key
    /// (the leader) it pins this node's key.
    pub fn token(&self) -> Option<JoinToken> {
        let leader = self
            .ca_key
            .as_ref()
            .and_then(|_| key_fingerprint(&self.chain[0]).ok());
        self.secret.map(|secret| JoinToken {
            ca: self.cluster(),
            secret,
            leader,
        })
    }

    /// Whether this node can sign certificates for joining nodes.
    pub fn can_sign(&self) -> bool {
        self.ca_key.is_some()
    }

    /// Signs a joining node's certificate request with the cluster CA. The
    /// request only contributes its public key (its signature is checked):
    /// names, usages and validity are set here.
    pub fn sign_csr(&self, csr_pem: &str, node_name: &str) -> Result<String, AuthError> {
        let ca_key_pem = self
            .ca_key
            .as_ref()
            .ok_or_else(|| AuthError::Cert("this node holds no CA key".into()))?;
        let ca = issuer(&self.ca_pem(), ca_key_pem)?;
        let mut csr =
            rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(cert_err)?;
        let params = node_cert_params(node_name, self.cert_lifetime)?;
        csr.params = params;
        Ok(csr.signed_by(&ca).map_err(cert_err)?.pem())
    }

    /// The CA certificate as PEM.
    pub fn ca_pem(&self) -> String {
        ::pem::encode(&::pem::Pem::new("CERTIFICATE", self.ca.to_vec()))
    }

    /// The identity of a leader that owns its cluster: creates the CA, a
    /// node certificate and the join secret in `dir` on first use, and loads
    /// them afterwards.
    pub fn load_or_init(dir: &Path, node_name: &str) -> Result<(Self, JoinToken), AuthError> {
        let (ca_pem, ca_key, node_pem, node_key, secret) = (
            dir.join("ca.pem"),
            dir.join("ca.key"),
            dir.join("node.pem"),
            dir.join("node.key"),
            dir.join("join-secret"),
        );
        if !ca_pem.exists() {
            std::fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
            let ca = ClusterCa::generate("ferry cluster CA")?;
            let node = ca.issue(node_name, DEFAULT_CERT_LIFETIME)?;
            let mut s = [0u8; 32];
            rand::Rng::fill(&mut rand::rng(), &mut s);
            write_private(&ca_key, ca.key_pem.as_bytes())?;
            write_private(&node_key, node.key_pem.as_bytes())?;
            write_private(&secret, hex::encode(s).as_bytes())?;
            std::fs::write(&node_pem, node.cert_pem).map_err(io_err("write", &node_pem))?;
            // The CA certificate last: its presence means the set is complete.
            std::fs::write(&ca_pem, ca.cert_pem).map_err(io_err("write", &ca_pem))?;
        }
        let auth = Self::load_dir(dir)?
            .ok_or_else(|| AuthError::Cert(format!("incomplete identity in {}", dir.display())))?;
        let token = auth.token().ok_or(AuthError::BadToken("no join secret"))?;
        Ok((auth, token))
    }

    /// The cluster id: the CA's fingerprint.
    pub fn cluster(&self) -> Fingerprint {
        fingerprint(&self.ca)
    }

    /// The server side of TLS: presents the chain; accepts clients with a
    /// CA-signed certificate, and (when a join secret is set) clients with
    /// no certificate, who must then prove the secret in `Hello`.
    pub fn server_crypto(&self) -> Result<rustls::ServerConfig, AuthError> {
        let provider = provider();
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone()).map_err(tls)?;
        let builder =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
        let verifier = if self.secret.is_some() {
            builder.allow_unauthenticated()
        } else {
            builder
        }
        .build()
        .map_err(tls)?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(tls)?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        cfg.max_early_data_size = 0;
        Ok(cfg)
    }

    /// The client side of TLS towards another node of this cluster.
    pub fn client_crypto(&self) -> Result<rustls::ClientConfig, AuthError> {
        let creds = self
            .client_cert
            .then(|| (self.chain.clone(), self.key.clone_key()));
        client_crypto(self.cluster(), Some(self.ca.clone()), creds, None)
    }

    /// Client credentials to reach this cluster: a token-holding identity
    /// uses its secret, an operator identity its certificate.
    pub fn client_credentials(&self) -> ClientAuth {
        ClientAuth {
            pin: None,
            cluster: self.cluster(),
            ca: Some(self.ca.clone()),
            secret: self.secret,
            cert: self
                .client_cert
                .then(|| (self.chain.clone(), Arc::clone(&self.key))),
        }
    }
}

/// A key and certificate request for joining a cluster.
pub struct Enrollment {
    key_pem: String,
    pub csr_pem: String,
}

impl Enrollment {
    /// A request with a new key.
    pub fn new(node_name: &str) -> Result<Self, AuthError> {
        let key = rcgen::KeyPair::generate().map_err(cert_err)?;
        Self::for_key(key.serialize_pem(), &key, node_name)
    }

    /// A request to renew the certificate of the identity in `dir`: the same
    /// key, so only `node.pem` changes and the renewal is one atomic write.
    pub fn renewal(dir: &Path, node_name: &str) -> Result<Self, AuthError> {
        let key_path = dir.join("node.key");
        let key_pem = std::fs::read_to_string(&key_path).map_err(io_err("read", &key_path))?;
        let key = rcgen::KeyPair::from_pem(&key_pem).map_err(cert_err)?;
        Self::for_key(key_pem, &key, node_name)
    }

    fn for_key(key_pem: String, key: &rcgen::KeyPair, node_name: &str) -> Result<Self, AuthError> {
        let mut params =
            rcgen::CertificateParams::new(vec![SERVER_NAME.to_owned()]).map_err(cert_err)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, node_name);
        let csr = params
            .serialize_request(key)
            .map_err(cert_err)?
            .pem()
            .map_err(cert_err)?;
        Ok(Self {
            key_pem,
            csr_pem: csr,
        })
    }

    /// Replaces the certificate in `dir` with a renewed one, after checking
    /// that it is for this key and from this cluster's CA.
    pub fn save_renewed(
        &self,
        dir: &Path,
        cert_pem: &str,
        ca_pem: &str,
    ) -> Result<NodeAuth, AuthError> {
        let ca = pem_certs(ca_pem)?.remove(0);
        let current = NodeAuth::load_dir(dir)?
            .ok_or_else(|| AuthError::Cert(format!("no identity in {}", dir.display())))?;
        if fingerprint(&ca) != current.cluster() {
            return Err(AuthError::Cert(
                "the renewed certificate comes from another CA".into(),
            ));
        }
        let cert = pem_certs(cert_pem)?.remove(0);
        let (_, x) = x509_parser::parse_x509_certificate(cert.as_ref()).map_err(cert_err)?;
        let key = rcgen::KeyPair::from_pem(&self.key_pem).map_err(cert_err)?;
        if x.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
            return Err(AuthError::Cert(
                "the renewed certificate is for another key".into(),
            ));
        }
        write_replace(&dir.join("node.pem"), cert_pem.as_bytes())?;
        NodeAuth::load_dir(dir)?.ok_or_else(|| AuthError::Cert("identity not saved".into()))
    }

    /// Stores the signed identity in `dir` (the layout [`NodeAuth::load_dir`]
    /// reads), with the join secret so this node can admit joiners too.
    pub fn save(
        &self,
        dir: &Path,
        cert_pem: &str,
        ca_pem: &str,
        token: &JoinToken,
    ) -> Result<NodeAuth, AuthError> {
        let ca = pem_certs(ca_pem)?.remove(0);
        if fingerprint(&ca) != token.ca {
            return Err(AuthError::Cert(
                "the CA sent does not match the token's fingerprint".into(),
            ));
        }
        std::fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        write_private(&dir.join("node.key"), self.key_pem.as_bytes())?;
        write_private(
            &dir.join("join-secret"),
            hex::encode(token.secret).as_bytes(),
        )?;
        write_private(&dir.join("node.pem"), cert_pem.as_bytes())?;
        write_private(&dir.join("ca.pem"), ca_pem.as_bytes())?;
        NodeAuth::load_dir(dir)?.ok_or_else(|| AuthError::Cert("identity not saved".into()))
    }
}

/// What a client needs to reach a cluster.
#[derive(Clone)]
pub struct ClientAuth {
    /// The CA fingerprint the server's chain must lead to.
    pub cluster: Fingerprint,
    /// The CA certificate, when known (otherwise the server sends it).
    pub ca: Option<CertificateDer<'static>>,
    /// The join secret, for token authentication.
    pub secret: Option<[u8; 32]>,
    /// A client certificate, for mutual TLS.
    pub cert: Option<(Vec<CertificateDer<'static>>, Arc<PrivateKeyDer<'static>>)>,
    /// The key fingerprint the server's certificate must carry (from a
    /// leader's `ferry2-` token): a node that only holds a CA-signed
    /// certificate cannot pose as the leader to a joining node.
    pub pin: Option<Fingerprint>,
}

impl fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientAuth")
            .field("cluster", &hex::encode(&self.cluster[..8]))
            .field("token", &self.secret.is_some())
            .field("cert", &self.cert.is_some())
            .finish()
    }
}

impl ClientAuth {
    pub fn from_token(token: &JoinToken) -> Self {
        Self {
            cluster: token.ca,
            ca: None,
            secret: Some(token.secret),
            cert: None,
            pin: token.leader,
        }
    }

    /// The same credentials without the leader pin: for a seed from a node
    /// the operator named (`--seed-from`), which is not the token's leader.
    pub fn unpinned(mut self) -> Self {
        self.pin = None;
        self
    }

    pub fn crypto(&self) -> Result<rustls::ClientConfig, AuthError> {
        let creds = self.cert.as_ref().map(|(c, k)| (c.clone(), k.clone_key()));
        client_crypto(self.cluster, self.ca.clone(), creds, self.pin)
    }
}

fn client_crypto(
    cluster: Fingerprint,
    ca: Option<CertificateDer<'static>>,
    creds: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    pin: Option<Fingerprint>,
) -> Result<rustls::ClientConfig, AuthError> {
    let provider = provider();
    let verifier = Arc::new(PinnedCa {
        cluster,
        ca,
        pin,
        provider: provider.clone(),
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match creds {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).map_err(tls)?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// ring's provider with AES-128-GCM preferred: as strong as needed for a
/// 128-bit security level, and 10 AES rounds per block instead of 14, which
/// shows on a bulk transfer.
fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

fn tls(e: impl fmt::Display) -> AuthError {
    AuthError::Tls(e.to_string())
}

/// Verifies a server's chain against the cluster CA, identified by its
/// fingerprint. The CA certificate comes from configuration or from the
/// chain the server sends; either way its fingerprint must match.
#[derive(Debug)]
struct PinnedCa {
    cluster: Fingerprint,
    ca: Option<CertificateDer<'static>>,
    /// The leader's key, when the token pins it.
    pin: Option<Fingerprint>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = self
            .ca
            .iter()
            .chain(intermediates.iter())
            .find(|c| fingerprint(c) == self.cluster)
            .ok_or(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ))?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        let verified =
            inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        if let Some(pin) = self.pin {
            if key_fingerprint(end_entity).ok() != Some(pin) {
                return Err(rustls::Error::General(
                    "this node is not the leader the join token was issued by (its key does not match the token's pin); to seed from a follower, use --seed-from or that follower's own token (`ferry token` on it); after a promotion, get a token from the new leader".into(),
                ));
            }
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The file that lists revoked node names, one per line.
pub const REVOKED_FILE: &str = "revoked";

/// Replaces `path` atomically and durably, readable by its owner only
/// (the engine's [`ferry_engine::paths::write_atomic_private`]).
pub fn write_replace(path: &Path, data: &[u8]) -> Result<(), AuthError> {
    ferry_engine::paths::write_atomic_private(path, data).map_err(|e| match e {
        ferry_engine::Error::Io { op, path, source } => AuthError::Io { op, path, source },
        other => AuthError::Cert(other.to_string()),
    })
}

/// Writes a secret file readable by its owner only.
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), AuthError> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    o.mode(0o600);
    let mut f = o.open(path).map_err(io_err("create", path))?;
    f.write_all(data).map_err(io_err("write", path))?;
    f.sync_all().map_err(io_err("sync", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trip_and_redaction() {
        let mut t = JoinToken {
            ca: [7; 32],
            secret: [9; 32],
            leader: None,
        };
        let s = t.to_string();
        assert!(s.starts_with("ferry1-"));
        assert_eq!(s.parse::<JoinToken>().unwrap(), t);
        t.leader = Some([5; 32]);
        let s = t.to_string();
        assert!(s.starts_with("ferry2-"));
        assert_eq!(s.parse::<JoinToken>().unwrap(), t);
        assert!(format!("{s}-00").parse::<JoinToken>().is_err());
        assert!(!format!("{t:?}").contains("0909"));
        assert!("ferry2-aa-bb".parse::<JoinToken>().is_err());
        assert!("ferry1-zz-bb".parse::<JoinToken>().is_err());
    }

    #[test]
    fn proofs_bind_secret_session_and_node() {
        let (s, e) = ([1; 32], [2; 32]);
        let p = join_proof(&s, &e, "n1");
        assert!(check_proof(&s, &e, "n1", &p));
        assert!(!check_proof(&[3; 32], &e, "n1", &p));
        assert!(!check_proof(&s, &[4; 32], "n1", &p));
        assert!(!check_proof(&s, &e, "n2", &p));
    }

    #[test]
    fn ca_issues_node_certs_and_configs_build() {
        let dir = tempfile::tempdir().unwrap();
        let (auth, token) = NodeAuth::load_or_init(dir.path(), "leader").unwrap();
        assert_eq!(token.ca, auth.cluster());
        let (again, token2) = NodeAuth::load_or_init(dir.path(), "leader").unwrap();
        assert_eq!(token, token2);
        assert_eq!(again.cluster(), auth.cluster());
        auth.server_crypto().unwrap();
        ClientAuth::from_token(&token).crypto().unwrap();
        // A joiner enrolls: the leader signs its request, the joiner saves it.
        let e = Enrollment::new("follower").unwrap();
        let cert = auth.sign_csr(&e.csr_pem, "follower").unwrap();
        let fdir = tempfile::tempdir().unwrap();
        let joined = e.save(fdir.path(), &cert, &auth.ca_pem(), &token).unwrap();
        assert_eq!(joined.cluster(), auth.cluster());
        assert!(!joined.can_sign() && auth.can_sign());
        joined.server_crypto().unwrap();
        joined.client_crypto().unwrap();
        assert!(e
            .save(
                fdir.path(),
                &cert,
                &auth.ca_pem(),
                &JoinToken {
                    ca: [0; 32],
                    secret: token.secret,
                    leader: None,
                }
            )
            .is_err());
    }
}

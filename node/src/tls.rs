//! Certificates and TLS for the mesh: a cluster CA made at `braid init` (rcgen), one certificate
//! per node whose DNS name is `node-<id>`, and rustls configurations that require a certificate
//! from the cluster CA on both sides of every QUIC connection (ALPN `braid/1`, TLS 1.3 only).

use std::path::Path;
use std::sync::Arc;

use braid_protocol::NodeId;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

/// The ALPN protocol of the mesh.
pub const ALPN: &[u8] = b"braid/1";

/// The bytes a peer may have in flight to this node on one connection, over all its streams:
/// four largest frames, which keeps a cross-region snapshot transfer at tens of MB/s.
const CONNECTION_WINDOW_BYTES: u32 = 16 * 1024 * 1024;

/// A TLS setup that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A PEM file does not hold what it should.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The configuration lacks what QUIC needs.
    #[error("quic: {0}")]
    Quic(String),
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The DNS name in node `id`'s certificate, and the server name used to connect to it.
pub fn node_dns_name(node: NodeId) -> String {
    format!("node-{}", node.0)
}

/// A CA certificate and key, in PEM.
#[derive(Debug, Clone)]
pub struct CaPem {
    /// The certificate.
    pub cert_pem: String,
    /// The private key (keep it secret: it can admit any node).
    pub key_pem: String,
}

/// A node certificate and key, in PEM.
#[derive(Debug, Clone)]
pub struct NodePem {
    /// The certificate, signed by the cluster CA.
    pub cert_pem: String,
    /// The private key.
    pub key_pem: String,
}

/// Generates a new cluster CA.
pub fn generate_ca(name: &str) -> Result<CaPem, TlsError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key)?;
    Ok(CaPem {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Generates node `node`'s certificate, signed by the CA.
pub fn generate_node_cert(ca: &CaPem, node: NodeId) -> Result<NodePem, TlsError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)?;
    let key = KeyPair::generate()?;
    let name = node_dns_name(node);
    let mut params = CertificateParams::new(vec![name.clone()])?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(NodePem {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The QUIC client and server configurations of one node.
#[derive(Debug, Clone)]
pub struct MeshTls {
    /// For accepting peers (client certificate required).
    pub server: quinn::ServerConfig,
    /// For connecting to peers (presents this node's certificate).
    pub client: quinn::ClientConfig,
    /// The QUIC endpoint's settings: a stateless-reset key and a connection-id key derived from
    /// the node's private key, the same in every process of the node. A restarted node then
    /// answers packets of its previous process's connections with a reset its peers believe, so
    /// they reconnect at once instead of waiting out the idle timeout.
    pub endpoint: quinn::EndpointConfig,
}

impl MeshTls {
    /// Builds both configurations from PEM files.
    pub fn load(ca_cert: &Path, cert: &Path, key: &Path) -> Result<MeshTls, TlsError> {
        let name = |path: &Path| path.display().to_string();
        MeshTls::parse(
            [&read(ca_cert)?, &read(cert)?, &read(key)?],
            [name(ca_cert), name(cert), name(key)],
        )
    }

    /// Builds both configurations from PEM text (the CA certificate, this node's certificate and
    /// its key).
    pub fn from_pem(ca_cert: &str, cert: &str, key: &str) -> Result<MeshTls, TlsError> {
        MeshTls::parse(
            [ca_cert.as_bytes(), cert.as_bytes(), key.as_bytes()],
            ["CA certificate", "certificate", "private key"].map(String::from),
        )
    }

    /// Builds both configurations from the PEM bytes of the CA certificates, this node's
    /// certificate chain and its key; `names` say where each came from, for errors.
    fn parse(pem: [&[u8]; 3], names: [String; 3]) -> Result<MeshTls, TlsError> {
        let [ca_name, cert_name, key_name] = names;
        let certificates = |pem: &[u8], name: String, what: &str| {
            let pem_err = |reason: String| TlsError::Pem {
                path: name.clone(),
                reason,
            };
            let all = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| pem_err(format!("bad {what}: {e}")))?;
            match all.is_empty() {
                true => Err(pem_err(format!("no {what}"))),
                false => Ok(all),
            }
        };
        // Every certificate of the CA file is trusted (an old and a new CA while nodes move
        // from one to the other), not only the first.
        let cas = certificates(pem[0], ca_name, "CA certificate")?;
        let chain = certificates(pem[1], cert_name, "certificate")?;
        let key = PrivateKeyDer::from_pem_slice(pem[2]).map_err(|e| TlsError::Pem {
            path: key_name,
            reason: format!("no private key: {e}"),
        })?;
        MeshTls::build(cas, chain, key)
    }

    fn build(
        cas: Vec<CertificateDer<'static>>,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<MeshTls, TlsError> {
        let mut roots = RootCertStore::empty();
        for ca in cas {
            roots.add(ca)?;
        }
        let roots = Arc::new(roots);
        let verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider()).build()?;
        // Both keys come from the node's private key, so every process of the node has them:
        // its connection ids validate and its resets are believed across a restart.
        let derive = |label: &[u8]| {
            let mut material = label.to_vec();
            material.extend_from_slice(key.secret_der());
            ring::digest::digest(&ring::digest::SHA256, &material)
        };
        let reset_key = ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            derive(b"braid stateless reset v1").as_ref(),
        );
        let mut cid_key = [0u8; 8];
        cid_key.copy_from_slice(&derive(b"braid connection id v1").as_ref()[..8]);
        let cid_key = u64::from_le_bytes(cid_key);
        let mut endpoint = quinn::EndpointConfig::new(Arc::new(reset_key));
        endpoint.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())?;
        server.alpn_protocols = vec![ALPN.to_vec()];
        let mut client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        client.alpn_protocols = vec![ALPN.to_vec()];
        let server = quinn::crypto::rustls::QuicServerConfig::try_from(server)
            .map_err(|e| TlsError::Quic(e.to_string()))?;
        let client = quinn::crypto::rustls::QuicClientConfig::try_from(client)
            .map_err(|e| TlsError::Quic(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server));
        let mut client = quinn::ClientConfig::new(Arc::new(client));
        let mut transport = quinn::TransportConfig::default();
        // Peers heartbeat every second; a connection silent for 10 s is dead.
        transport.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(
            10_000,
        ))));
        transport.keep_alive_interval(Some(std::time::Duration::from_secs(1)));
        // Every stream of the mesh is bidirectional: a peer may open no other kind (quinn
        // would otherwise buffer up to a stream window on each of 100 it never reads).
        transport.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
        // What one connection's streams may hold unread, all together (quinn's default is
        // unbounded: each stream's own window times the streams a peer opens).
        transport.receive_window(quinn::VarInt::from_u32(CONNECTION_WINDOW_BYTES));
        let transport = Arc::new(transport);
        server.transport_config(transport.clone());
        client.transport_config(transport);
        Ok(MeshTls {
            server,
            client,
            endpoint,
        })
    }
}

/// The node id a peer's certificate names (its `node-<id>` DNS name), or `None`.
pub fn peer_node(connection: &quinn::Connection) -> Option<NodeId> {
    let chain = connection
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    named_node(chain.first()?)
}

/// Checks that the certificate at `path` is `node`'s: peers know a node by the `node-<id>`
/// name in its certificate, and one made for another node would be refused by every peer, or
/// taken for that other node.
pub fn check_own_certificate(path: &Path, node: NodeId) -> Result<(), TlsError> {
    let leaf = CertificateDer::pem_slice_iter(&read(path)?)
        .next()
        .and_then(|cert| cert.ok());
    let named = leaf.as_ref().and_then(named_node);
    match named {
        Some(named) if named == node => Ok(()),
        named => Err(TlsError::Pem {
            path: path.display().to_string(),
            reason: format!(
                "the certificate is for {}, and this node is {node} (node-id): use the \
                 certificate made for it",
                named.map_or("no node".to_string(), |n| format!("{n}"))
            ),
        }),
    }
}

/// The node a certificate names with its `node-<id>` DNS name.
fn named_node(leaf: &CertificateDer<'_>) -> Option<NodeId> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::DNSName(dns) => {
            dns.strip_prefix("node-")?.parse().ok().map(NodeId)
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_starts_only_with_its_own_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let ca = generate_ca("test").unwrap();
        let cert = generate_node_cert(&ca, NodeId(2)).unwrap();
        let path = dir.path().join("node.pem");
        std::fs::write(&path, &cert.cert_pem).unwrap();
        check_own_certificate(&path, NodeId(2)).unwrap();
        let err = check_own_certificate(&path, NodeId(3))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("for n2") && err.contains("this node is n3"),
            "{err}"
        );
        std::fs::write(&path, "not a certificate").unwrap();
        assert!(check_own_certificate(&path, NodeId(2)).is_err());
    }

    /// A CA file with two certificates trusts both: a node whose certificate the second signed
    /// connects to one whose certificate the first signed, and the other way round.
    #[test]
    fn every_ca_of_the_ca_file_is_trusted() {
        let old = generate_ca("old").unwrap();
        let new = generate_ca("new").unwrap();
        let both = format!("{}{}", old.cert_pem, new.cert_pem);
        let one = generate_node_cert(&old, NodeId(1)).unwrap();
        let two = generate_node_cert(&new, NodeId(2)).unwrap();
        let tls = |node: &NodePem| MeshTls::from_pem(&both, &node.cert_pem, &node.key_pem).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            for (server, client, name) in [(&one, &two, "node-1"), (&two, &one, "node-2")] {
                let server =
                    quinn::Endpoint::server(tls(server).server, "127.0.0.1:0".parse().unwrap())
                        .unwrap();
                let addr = server.local_addr().unwrap();
                let accept = async {
                    let incoming = server.accept().await.unwrap();
                    incoming.await.map(|_| ())
                };
                let mut client_end =
                    quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
                client_end.set_default_client_config(tls(client).client);
                let connect = async { client_end.connect(addr, name).unwrap().await.map(|_| ()) };
                let (accepted, connected) =
                    tokio::time::timeout(std::time::Duration::from_secs(10), async {
                        tokio::join!(accept, connect)
                    })
                    .await
                    .expect("the handshake ends");
                accepted.unwrap();
                connected.unwrap();
            }
        });
    }
}

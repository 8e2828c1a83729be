//! Throwaway TLS credentials for the tests and the benchmarks: a CA made at
//! run time (`rcgen`), and certificates it signs, in PEM files, so that
//! both ends of a migration load them as an operator's would be loaded.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};

/// One side's files: its certificate, its key, the CA it trusts.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The certificate, PEM.
    pub cert: PathBuf,
    /// Its private key, PEM.
    pub key: PathBuf,
    /// The CA's certificate, PEM.
    pub ca: PathBuf,
}

impl Credentials {
    /// The command-line arguments that name them.
    pub fn args(&self) -> Vec<String> {
        let p = |p: &Path| p.display().to_string();
        vec![
            "--tls-cert".into(),
            p(&self.cert),
            "--tls-key".into(),
            p(&self.key),
            "--tls-ca".into(),
            p(&self.ca),
        ]
    }
}

/// A CA of its own, named `ca_name`, in `dir`: returns it (to sign with)
/// and the path of its certificate.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    cert: PathBuf,
}

impl Authority {
    /// A new CA, its certificate written to `dir/<name>-ca.pem`.
    pub fn new(dir: &Path, name: &str) -> Result<Self, Box<dyn std::error::Error>> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, format!("{name} CA"));
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let path = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&path, cert.pem())?;
        Ok(Self { issuer: Issuer::new(params, key), cert: path })
    }

    /// A certificate for `names` (host names or addresses), for both a
    /// server and a client, signed by this CA, written to
    /// `dir/<file>.pem` and `dir/<file>-key.pem`.
    pub fn issue(
        &self,
        dir: &Path,
        file: &str,
        names: &[&str],
    ) -> Result<Credentials, Box<dyn std::error::Error>> {
        let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let (cert_path, key_path) = (dir.join(format!("{file}.pem")), dir.join(format!("{file}-key.pem")));
        std::fs::write(&cert_path, cert.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        Ok(Credentials { cert: cert_path, key: key_path, ca: self.cert.clone() })
    }
}

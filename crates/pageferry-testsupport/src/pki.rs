//! A small PKI for TLS tests, written in the `--tls-creds` layout (QEMU's file names): one
//! copy for the library's in-process TLS tests and the CLI's two-process ones.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// A certificate authority: its certificate and the key that signs leaves.
pub struct Ca {
    pub cert: rcgen::Certificate,
    pub key: rcgen::KeyPair,
}

/// A self-signed CA with common name `name`.
pub fn ca(name: &str) -> Ca {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    Ca { cert: p.self_signed(&key).unwrap(), key }
}

/// Write `text` to `dir/name`, readable by its owner only (as key files must be).
pub fn write(dir: &Path, name: &str, text: &str) {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Write `role`-cert.pem / `role`-key.pem signed by `ca` into `dir`: common name `cn`, SANs
/// `sans`, valid only in 2020 when `expired`.
pub fn leaf(dir: &Path, ca: &Ca, role: &str, cn: &str, sans: &[&str], expired: bool) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    if expired {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let cert = p.signed_by(&key, &ca.cert, &ca.key).unwrap();
    write(dir, &format!("{role}-cert.pem"), &cert.pem());
    write(dir, &format!("{role}-key.pem"), &key.serialize_pem());
}

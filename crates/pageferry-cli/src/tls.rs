//! TLS flags, named like QEMU's `tls-creds-x509` / `tls-creds-psk` objects and migration
//! parameters, turned into the rustls configurations the library takes.

use anyhow::{bail, Context, Result};
use pageferry::transport::creds::{self, TlsClient};
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::sync::Arc;

/// Destination (`recv`) TLS flags.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct RecvTlsArgs {
    /// x509 credentials directory: ca-cert.pem, server-cert.pem, server-key.pem.
    #[arg(long = "tls-creds", value_name = "DIR", conflicts_with = "tls_psk")]
    pub tls_creds: Option<PathBuf>,
    /// Pre-shared keys in QEMU's keys.psk format (identity:hexkey lines), or a directory
    /// holding keys.psk.
    #[arg(long = "tls-psk", value_name = "FILE")]
    pub tls_psk: Option<PathBuf>,
    /// Require the source to present a certificate signed by ca-cert.pem (x509).
    #[arg(long = "tls-verify-peer", value_name = "on|off", default_value = "on", value_parser = clap::builder::BoolishValueParser::new())]
    pub tls_verify_peer: bool,
    /// Only these peers may connect: a certificate's subject DN (CN=a,O=b), common name or
    /// DNS/IP subject alternative name; with --tls-psk, an identity. Repeat for several.
    #[arg(long = "tls-authz", value_name = "NAME")]
    pub tls_authz: Vec<String>,
    /// Listen on a non-loopback address without TLS (anyone who reaches the port can write
    /// this destination's memory and read nothing back; the data crosses the network in clear).
    #[arg(long)]
    pub insecure: bool,
}

/// Source (`send`) TLS flags.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct SendTlsArgs {
    /// x509 credentials directory: ca-cert.pem, client-cert.pem, client-key.pem.
    #[arg(long = "tls-creds", value_name = "DIR", conflicts_with = "tls_psk")]
    pub tls_creds: Option<PathBuf>,
    /// Pre-shared keys in QEMU's keys.psk format, or a directory holding keys.psk.
    #[arg(long = "tls-psk", value_name = "FILE")]
    pub tls_psk: Option<PathBuf>,
    /// The PSK identity to use (default: the file's only identity).
    #[arg(long = "tls-psk-identity", value_name = "ID", requires = "tls_psk")]
    pub tls_psk_identity: Option<String>,
    /// The name the destination's certificate must carry (default: the host of --connect).
    #[arg(long = "tls-hostname", value_name = "NAME", requires = "tls_creds")]
    pub tls_hostname: Option<String>,
}

fn warn(warnings: Vec<String>) {
    for w in warnings {
        eprintln!("pageferry: warning: {w}");
    }
}

impl RecvTlsArgs {
    /// The server configuration, or None for plain TCP; refuses plain TCP on a non-loopback
    /// address unless --insecure.
    pub fn server_config(&self, listen: &str) -> Result<Option<Arc<rustls::ServerConfig>>> {
        if let Some(dir) = &self.tls_creds {
            let loaded = creds::x509_server(dir, self.tls_verify_peer, &self.tls_authz)?;
            warn(loaded.warnings);
            return Ok(Some(loaded.config));
        }
        if let Some(file) = &self.tls_psk {
            let loaded = creds::load_psk_file(file)?;
            warn(loaded.warnings);
            return Ok(Some(creds::psk_server(&loaded.config, &self.tls_authz)?));
        }
        if !self.tls_authz.is_empty() {
            bail!("--tls-authz needs --tls-creds or --tls-psk");
        }
        let loopback = listen.to_socket_addrs().map(|mut a| a.all(|a| a.ip().is_loopback())).unwrap_or(false);
        if !loopback && !self.insecure {
            bail!("refusing to listen on {listen} without TLS: anyone who can reach it could write this machine's memory, and guest RAM would cross the network in clear; give --tls-creds DIR or --tls-psk FILE, or --insecure to accept that");
        }
        Ok(None)
    }

}

impl SendTlsArgs {
    pub fn client_config(&self) -> Result<Option<TlsClient>> {
        if let Some(dir) = &self.tls_creds {
            let loaded = creds::x509_client(dir, self.tls_hostname.clone())?;
            warn(loaded.warnings);
            return Ok(Some(loaded.config));
        }
        if let Some(file) = &self.tls_psk {
            let loaded = creds::load_psk_file(file)?;
            warn(loaded.warnings);
            let identity = match (&self.tls_psk_identity, loaded.config.as_slice()) {
                (Some(id), _) => id.clone(),
                (None, [only]) => only.identity.clone(),
                (None, _) => bail!("{} holds several identities: choose one with --tls-psk-identity", file.display()),
            };
            return Ok(Some(creds::psk_client(&loaded.config, &identity).context("--tls-psk")?));
        }
        Ok(None)
    }

}

/// Throwaway x509 credentials for `demo --tls` / `bench --tls`, valid for loopback; removed
/// when dropped.
pub struct Throwaway {
    pub dir: tempfile::TempDir,
}

impl Throwaway {
    pub fn new() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("pageferry-tls-").tempdir().context("temporary directory for TLS credentials")?;
        creds::write_throwaway_x509(dir.path(), &["localhost", "127.0.0.1"])?;
        Ok(Self { dir })
    }
    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }
}


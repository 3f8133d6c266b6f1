//! The CA certificates a `--tls-ca` names, as the NATS client is given them. The file is
//! checked and read through one descriptor (`secret::read_checked`), so no swap after the
//! check is read; its bytes are then copied into a sealed in-memory file (a memfd no one can
//! write, shrink or grow), which async-nats is given by its `/proc/self/fd` name
//! (`add_root_certificates`). Given a path, async-nats 0.51 trusts those certificates in place
//! of the system's store and never loads that store; given a built `ClientConfig`
//! (`tls_client_config`) it loads the system store anyway, throws it away, and fails the
//! connection if loading it had any error (an `SSL_CERT_FILE` naming no file, one unreadable
//! file in the system's directory).

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use async_nats::rustls::ClientConfig;

/// The CA certificates a connection trusts, and no others, in the form async-nats is given.
pub(crate) enum Trust {
    /// A sealed in-memory copy of the bytes checked, and its `/proc/self/fd` name. async-nats
    /// opens that name at each TLS connect, reconnects included: the copy is kept open as long
    /// as the client.
    Sealed { _copy: File, name: PathBuf },
    /// Where the copy cannot be named (no /proc mounted, or one of another PID namespace; a
    /// systemd unit's `ProcSubset=pid` keeps /proc/self/fd, so it is not one of these): the
    /// configuration built from the bytes checked. Still no swap after the check, but
    /// async-nats then also loads the system's store (unused), and fails if that has errors.
    Config(Box<ClientConfig>),
}

impl Trust {
    /// Checks and reads the CA file `ca` (`FileRule::Trust`) and parses it, so that a file
    /// that is not CA certificates is an error at start naming it, not a failed handshake.
    pub(crate) fn of(ca: &Path) -> Result<Trust> {
        let pem = crate::secret::read_checked(ca, crate::secret::FileRule::Trust)
            .map_err(|e| anyhow!("the CA certificates: {e}"))?;
        let config =
            trusting(&pem).with_context(|| format!("the CA certificates {}", ca.display()))?;
        Ok(match sealed(&pem) {
            Ok((copy, name)) => Trust::Sealed { _copy: copy, name },
            Err(e) => {
                tracing::debug!(
                    "the CA certificates given as a configuration, not a sealed copy: {e}"
                );
                Trust::Config(Box::new(config))
            }
        })
    }

    /// `opts`, trusting these certificates and no others.
    pub(crate) fn given_to(&self, opts: async_nats::ConnectOptions) -> async_nats::ConnectOptions {
        match self {
            Trust::Sealed { name, .. } => opts.add_root_certificates(name.clone()),
            Trust::Config(config) => opts.tls_client_config(ClientConfig::clone(config)),
        }
    }
}

/// A sealed in-memory file holding `pem` (close-on-exec), and the name under /proc/self/fd
/// that opens it: an error if that name does not lead to it.
fn sealed(pem: &[u8]) -> std::io::Result<(File, PathBuf)> {
    use rustix::fs::{fcntl_add_seals, memfd_create, MemfdFlags, SealFlags};
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let fd = memfd_create(
        "filepipe-tls-ca",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?;
    let mut copy = File::from(fd);
    copy.write_all(pem)?;
    // Sealed against any change, and against its seals being taken off: whoever opens it
    // (async-nats, by its name) reads the bytes checked.
    fcntl_add_seals(
        &copy,
        SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL,
    )?;
    let name = PathBuf::from(format!("/proc/self/fd/{}", copy.as_raw_fd()));
    // The name must lead to this copy: without /proc, or with one of another PID namespace
    // mounted, it leads nowhere or elsewhere.
    let (named, held) = (File::open(&name)?.metadata()?, copy.metadata()?);
    if (named.dev(), named.ino()) != (held.dev(), held.ino()) {
        return Err(std::io::Error::other(format!(
            "{} is not the copy made",
            name.display()
        )));
    }
    Ok((copy, name))
}

/// A TLS client configuration that trusts the CA certificates in `pem` (a PEM file's bytes)
/// and no others, as async-nats's `add_root_certificates` does with the file it is given.
fn trusting(pem: &[u8]) -> Result<ClientConfig> {
    use async_nats::rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = async_nats::rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| anyhow!("not PEM certificates: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| anyhow!("a certificate that cannot be a CA's: {e}"))?;
    }
    if roots.is_empty() {
        bail!("no certificate in it (PEM: -----BEGIN CERTIFICATE-----)");
    }
    Ok(ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn the_sealed_copy_is_named_by_proc_and_cannot_be_changed() {
        let (mut copy, name) = match sealed(b"-----BEGIN CERTIFICATE-----\n") {
            Ok(made) => made,
            Err(e) => {
                eprintln!("SKIPPED: no sealed copy here: {e}");
                return;
            }
        };
        let mut read = String::new();
        File::open(&name)
            .and_then(|mut f| f.read_to_string(&mut read))
            .unwrap();
        assert_eq!(read, "-----BEGIN CERTIFICATE-----\n");
        assert!(copy.write_all(b"x").is_err(), "written after it was sealed");
        assert!(copy.set_len(0).is_err(), "shrunk after it was sealed");
        let reopened = File::options().write(true).open(&name);
        assert!(
            reopened.and_then(|mut f| f.write_all(b"x")).is_err(),
            "written through its name after it was sealed"
        );
    }
}

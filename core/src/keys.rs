//! The server's ed25519 signing key: generated on first start, kept in the data directory as
//! `signing.key` (one line: `ed25519 <version> <unpadded base64 PKCS#8 document>`).

use std::path::Path;

use base64::{engine::general_purpose::STANDARD_NO_PAD, Engine};
use ruma::signatures::{Ed25519KeyPair, KeyPair};

use crate::{Error, Result};

/// The server's signing key with its key ID version (`ed25519:<version>`).
pub struct SigningKey {
    pub pair: Ed25519KeyPair,
}

impl SigningKey {
    /// Loads `path`, or generates and writes a new key there when the file does not exist.
    pub fn load_or_generate(path: &Path) -> Result<Self> {
        if path.exists() {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Error::internal(format!("reading {}: {e}", path.display())))?;
            return Self::parse(&text)
                .map_err(|e| Error::internal(format!("{}: {e}", path.display())));
        }
        let der = Ed25519KeyPair::generate().to_vec();
        let version = format!("a_{}", random_alnum(4));
        let line = format!("ed25519 {version} {}\n", STANDARD_NO_PAD.encode(&der));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::internal(format!("creating {}: {e}", dir.display())))?;
        }
        write_private(path, line.as_bytes())
            .map_err(|e| Error::internal(format!("writing {}: {e}", path.display())))?;
        Self::parse(&line).map_err(Error::internal)
    }

    fn parse(text: &str) -> Result<Self, String> {
        let mut parts = text.split_whitespace();
        let (Some("ed25519"), Some(version), Some(b64)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err("expected `ed25519 <version> <base64>`".to_owned());
        };
        let der = STANDARD_NO_PAD
            .decode(b64.trim_end_matches('='))
            .map_err(|e| format!("bad base64: {e}"))?;
        let pair = Ed25519KeyPair::from_der(&der, version.to_owned())
            .map_err(|e| format!("bad key: {e}"))?;
        Ok(SigningKey { pair })
    }

    /// The key ID, e.g. `ed25519:a_Xyz1`.
    pub fn key_id(&self) -> String {
        format!("ed25519:{}", self.pair.version())
    }

    /// The public key, unpadded base64.
    pub fn public_key_base64(&self) -> String {
        STANDARD_NO_PAD.encode(self.pair.public_key())
    }

    /// Signs `message`, returning the unpadded base64 signature.
    pub fn sign(&self, message: &[u8]) -> String {
        STANDARD_NO_PAD.encode(self.pair.sign(message).as_bytes())
    }
}

fn random_alnum(n: usize) -> String {
    use rand::{distributions::Alphanumeric, Rng};
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_survives_a_reload() {
        let dir = std::env::temp_dir().join(format!("myelin-key-{}", random_alnum(8)));
        let path = dir.join("signing.key");
        let a = SigningKey::load_or_generate(&path).unwrap();
        let b = SigningKey::load_or_generate(&path).unwrap();
        assert_eq!(a.key_id(), b.key_id());
        assert_eq!(a.public_key_base64(), b.public_key_base64());
        assert_eq!(a.sign(b"x"), b.sign(b"x"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}

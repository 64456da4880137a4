//! The server's master key: encrypts secrets keyward must be able to read back (JWT signing
//! keys, later TOTP secrets). From `KEYWARD_MASTER_KEY` (32 bytes as base64url or hex), or a
//! file `<server.data_dir>/master.key` generated with mode 0600 on first start.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use secrecy::zeroize::Zeroizing;

pub const MASTER_KEY_ENV: &str = "KEYWARD_MASTER_KEY";
const NONCE_LEN: usize = 24;

pub struct MasterKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(…)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MasterKeyError {
    #[error("{MASTER_KEY_ENV} must be 32 bytes as base64url (43 characters) or hex (64)")]
    BadEnv,
    #[error("the master key file {0} is not 32 bytes of base64url")]
    BadFile(String),
    #[error("cannot read or write the master key file {0}: {1}")]
    Io(String, std::io::Error),
    #[error("the operating system's random source failed")]
    Random,
    #[error("a secret could not be decrypted: wrong master key or damaged data")]
    Decrypt,
}

fn parse(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        (0..32)
            .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok())
            .collect::<Option<Vec<u8>>>()?
    } else {
        URL_SAFE_NO_PAD.decode(text.trim_end_matches('=')).ok()?
    };
    <[u8; 32]>::try_from(bytes.as_slice()).ok()
}

impl MasterKey {
    /// The environment wins; otherwise the file, created when missing.
    pub fn load(data_dir: &Path) -> Result<Self, MasterKeyError> {
        if let Ok(value) = std::env::var(MASTER_KEY_ENV) {
            return parse(&value)
                .map(|k| Self(Zeroizing::new(k)))
                .ok_or(MasterKeyError::BadEnv);
        }
        let path = data_dir.join("master.key");
        let shown = path.display().to_string();
        if path.exists() {
            let text = Zeroizing::new(
                std::fs::read_to_string(&path).map_err(|e| MasterKeyError::Io(shown.clone(), e))?,
            );
            return parse(&text)
                .map(|k| Self(Zeroizing::new(k)))
                .ok_or(MasterKeyError::BadFile(shown));
        }
        let mut key = Zeroizing::new([0u8; 32]);
        keyward_core::key_format::fill_random(key.as_mut()).map_err(|_| MasterKeyError::Random)?;
        std::fs::create_dir_all(data_dir).map_err(|e| MasterKeyError::Io(shown.clone(), e))?;
        write_private(&path, &URL_SAFE_NO_PAD.encode(key.as_ref()))
            .map_err(|e| MasterKeyError::Io(shown.clone(), e))?;
        tracing::warn!(path = %shown, "generated a new master key; back it up: without it the signing keys cannot be read");
        Ok(Self(key))
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// `nonce || ciphertext` (XChaCha20-Poly1305, random 24-byte nonce).
    pub fn encrypt(&self, plaintext: &[u8]) -> Result<Vec<u8>, MasterKeyError> {
        let cipher = XChaCha20Poly1305::new(self.0.as_ref().into());
        let mut nonce = [0u8; NONCE_LEN];
        keyward_core::key_format::fill_random(&mut nonce).map_err(|_| MasterKeyError::Random)?;
        let ciphertext = cipher
            .encrypt(&XNonce::from(nonce), plaintext)
            .map_err(|_| MasterKeyError::Random)?;
        let mut out = nonce.to_vec();
        out.extend(ciphertext);
        Ok(out)
    }

    pub fn decrypt(&self, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, MasterKeyError> {
        if sealed.len() < NONCE_LEN {
            return Err(MasterKeyError::Decrypt);
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| MasterKeyError::Decrypt)?;
        let cipher = XChaCha20Poly1305::new(self.0.as_ref().into());
        cipher
            .decrypt(&XNonce::from(nonce), ciphertext)
            .map(Zeroizing::new)
            .map_err(|_| MasterKeyError::Decrypt)
    }
}

#[cfg(unix)]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())
}

#[cfg(not(unix))]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    std::fs::write(path, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tamper_detection() {
        let key = MasterKey::from_bytes([7; 32]);
        let sealed = key.encrypt(b"signing key").unwrap();
        assert_eq!(key.decrypt(&sealed).unwrap().as_slice(), b"signing key");
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(key.decrypt(&tampered).is_err());
        assert!(MasterKey::from_bytes([8; 32]).decrypt(&sealed).is_err());
        assert!(parse(&"ab".repeat(32)).is_some());
        assert!(parse("short").is_none());
    }

    #[test]
    fn generated_file_is_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let a = MasterKey::load(dir.path()).unwrap();
        let b = MasterKey::load(dir.path()).unwrap();
        assert_eq!(a.0.as_ref(), b.0.as_ref());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("master.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}

//! Probe tokens sealed at rest with XChaCha20-Poly1305.
//!
//! The probe must send each server's token, so a hash will not do: tokens are encrypted under
//! a key the server is given (`FLEET_SECRET_KEY`, 32 bytes in base64). Each sealed token
//! records the id of the key that sealed it, and older keys can be kept for opening, so a key
//! can be rotated without a flag day. The server's id is bound in as associated data, so a
//! sealed token copied to another row does not open.

use std::fmt;

use base64::Engine;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use fleet_core::{ApiToken, ServerId};
use sha2::{Digest, Sha256};

const NONCE_LEN: usize = 24;

/// Why a key or a sealed token could not be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// The key is not 32 bytes of base64.
    #[error("FLEET_SECRET_KEY must be 32 bytes in base64: {0}")]
    BadKey(String),
    /// A token must be stored but no key was given.
    #[error("storing a probe token needs a secret key: set FLEET_SECRET_KEY (32 bytes, base64)")]
    NoKey,
    /// The token was sealed with a key that is not configured.
    #[error("probe token sealed with key {0}, which is not configured")]
    UnknownKey(String),
    /// The sealed bytes do not open with the key.
    #[error("probe token does not decrypt with key {0}")]
    Corrupt(String),
}

/// A 32-byte key. Its `Debug` shows only its id.
#[derive(Clone)]
pub struct SecretKey {
    id: String,
    cipher: XChaCha20Poly1305,
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({})", self.id)
    }
}

impl SecretKey {
    /// Reads a key from base64 (standard alphabet, padding optional).
    pub fn from_base64(text: &str) -> Result<Self, CryptoError> {
        let text = text.trim();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(text))
            .map_err(|e| CryptoError::BadKey(format!("not base64 ({e})")))?;
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| CryptoError::BadKey(format!("decodes to {} bytes", b.len())))?;
        Ok(Self::from_bytes(bytes))
    }

    /// A key from raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        let digest = Sha256::digest(bytes);
        let id = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
        Self {
            id,
            cipher: XChaCha20Poly1305::new(&bytes.into()),
        }
    }

    /// A fresh random key.
    pub fn generate() -> Self {
        Self::from_bytes(XChaCha20Poly1305::generate_key(&mut OsRng).into())
    }

    /// A public fingerprint of the key, stored beside each token it seals.
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// The keys a store seals and opens tokens with: one current key, and older ones for opening.
#[derive(Clone, Debug, Default)]
pub struct TokenVault {
    current: Option<SecretKey>,
    previous: Vec<SecretKey>,
}

impl TokenVault {
    /// A vault sealing with `current` (none: storing tokens is refused).
    pub fn new(current: Option<SecretKey>) -> Self {
        Self {
            current,
            previous: Vec::new(),
        }
    }

    /// Also opens tokens sealed with `key`.
    pub fn with_previous(mut self, key: SecretKey) -> Self {
        self.previous.push(key);
        self
    }

    /// Whether a configured key (current or previous) has the id `key_id`.
    pub fn has_key(&self, key_id: &str) -> bool {
        self.current
            .iter()
            .chain(&self.previous)
            .any(|k| k.id == key_id)
    }

    /// The current key's id, if there is one.
    pub fn current_id(&self) -> Option<&str> {
        self.current.as_ref().map(SecretKey::id)
    }

    /// Seals `token` for `server`: the sealed bytes and the sealing key's id.
    pub fn seal(
        &self,
        server: ServerId,
        token: &ApiToken,
    ) -> Result<(Vec<u8>, String), CryptoError> {
        let key = self.current.as_ref().ok_or(CryptoError::NoKey)?;
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let payload = Payload {
            msg: token.expose().as_bytes(),
            aad: server.0.as_bytes(),
        };
        let sealed = key
            .cipher
            .encrypt(&nonce, payload)
            .map_err(|_| CryptoError::Corrupt(key.id.clone()))?;
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok((out, key.id.clone()))
    }

    /// Opens a token sealed for `server` with the key `key_id`.
    pub fn open(
        &self,
        server: ServerId,
        sealed: &[u8],
        key_id: &str,
    ) -> Result<ApiToken, CryptoError> {
        let key = self
            .current
            .iter()
            .chain(&self.previous)
            .find(|k| k.id == key_id)
            .ok_or_else(|| CryptoError::UnknownKey(key_id.to_owned()))?;
        if sealed.len() < NONCE_LEN {
            return Err(CryptoError::Corrupt(key_id.to_owned()));
        }
        let (nonce, msg) = sealed.split_at(NONCE_LEN);
        let plain = key
            .cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg,
                    aad: server.0.as_bytes(),
                },
            )
            .map_err(|_| CryptoError::Corrupt(key_id.to_owned()))?;
        String::from_utf8(plain)
            .map(ApiToken::new)
            .map_err(|_| CryptoError::Corrupt(key_id.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_and_open_round_trip() {
        let vault = TokenVault::new(Some(SecretKey::generate()));
        let id = ServerId::new();
        let (sealed, key_id) = vault.seal(id, &ApiToken::new("tok-1")).unwrap();
        assert!(!sealed.windows(5).any(|w| w == b"tok-1"));
        assert_eq!(vault.open(id, &sealed, &key_id).unwrap().expose(), "tok-1");
        // Bound to its server.
        assert_eq!(
            vault.open(ServerId::new(), &sealed, &key_id),
            Err(CryptoError::Corrupt(key_id.clone()))
        );
    }

    #[test]
    fn rotation_keeps_old_tokens_open() {
        let old = SecretKey::generate();
        let id = ServerId::new();
        let (sealed, old_id) = TokenVault::new(Some(old.clone()))
            .seal(id, &ApiToken::new("t"))
            .unwrap();
        let rotated = TokenVault::new(Some(SecretKey::generate()));
        assert_eq!(
            rotated.open(id, &sealed, &old_id),
            Err(CryptoError::UnknownKey(old_id.clone()))
        );
        let rotated = rotated.with_previous(old);
        assert_eq!(rotated.open(id, &sealed, &old_id).unwrap().expose(), "t");
    }

    #[test]
    fn without_a_key_sealing_is_refused() {
        let err = TokenVault::new(None)
            .seal(ServerId::new(), &ApiToken::new("t"))
            .unwrap_err();
        assert_eq!(err, CryptoError::NoKey);
        assert!(err.to_string().contains("FLEET_SECRET_KEY"));
    }

    #[test]
    fn bad_keys_are_refused_with_the_setting_named() {
        for bad in ["", "not base64!!", "AAAA"] {
            let err = SecretKey::from_base64(bad).unwrap_err().to_string();
            assert!(
                err.starts_with("FLEET_SECRET_KEY must be 32 bytes in base64"),
                "{err}"
            );
        }
        let good = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        let key = SecretKey::from_base64(&good).unwrap();
        assert!(!format!("{key:?}").contains(&good));
    }
}

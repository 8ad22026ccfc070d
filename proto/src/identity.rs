//! Identity: every peer owns an Ed25519 key pair, and its [`PeerId`] is derived from the public key.
//!
//! The text form of a `PeerId` is `vp1` followed by the lowercase, unpadded base32 of the 32-byte public key
//! (55 characters in all). It is stable: the same key always gives the same text, and the text decodes back to the
//! key, so a signature can be checked from a `PeerId` alone.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::LazyLock;

use data_encoding::{Encoding, Specification};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

/// Prefix of the text form; the version digit lets a later key type get another prefix.
const PEER_ID_PREFIX: &str = "vp1";
/// Characters of the base32 body of a 32-byte key.
const BODY_LEN: usize = 52;

/// RFC 4648 base32 without padding, written in lowercase; reading also takes uppercase. Trailing bits must be
/// zero, so each key has exactly one text form.
static BASE32_LOWER: LazyLock<Encoding> = LazyLock::new(|| {
    let mut spec = Specification::new();
    spec.symbols.push_str("abcdefghijklmnopqrstuvwxyz234567");
    spec.translate.from.push_str("ABCDEFGHIJKLMNOPQRSTUVWXYZ");
    spec.translate.to.push_str("abcdefghijklmnopqrstuvwxyz");
    spec.encoding().expect("a valid base32 specification")
});

/// Why a `PeerId`, key or signature was rejected.
#[derive(Debug, thiserror::Error)]
pub enum PeerIdError {
    #[error("peer id must start with {PEER_ID_PREFIX:?}")]
    BadPrefix,
    #[error("peer id is not valid base32: {0}")]
    BadEncoding(#[from] data_encoding::DecodeError),
    #[error("public key must be 32 bytes, got {0}")]
    BadKeyLength(usize),
    #[error("public key is not a valid Ed25519 point")]
    InvalidKey,
    #[error("signature must be 64 bytes, got {0}")]
    BadSignatureLength(usize),
    #[error("signature does not verify")]
    BadSignature,
}

/// The name of a peer: its Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId([u8; 32]);

impl PeerId {
    /// Builds a `PeerId` from raw public key bytes (32 of them).
    ///
    /// Whether the bytes are a usable Ed25519 key is checked where it matters, when the peer proves it owns the
    /// key ([`PeerId::verify`], at attach): that check decompresses a curve point, about as costly as the rest
    /// of a message's handling, and every message names two peers. A `PeerId` that is not a usable key can be
    /// written to (its mailbox fills up to its quota) but nobody can ever attach as it.
    pub fn from_public_key_bytes(bytes: &[u8]) -> Result<Self, PeerIdError> {
        let raw: [u8; 32] = bytes
            .try_into()
            .map_err(|_| PeerIdError::BadKeyLength(bytes.len()))?;
        Ok(Self(raw))
    }

    /// The raw public key.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Verifies an Ed25519 signature made by this peer over `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), PeerIdError> {
        let key = VerifyingKey::from_bytes(&self.0).map_err(|_| PeerIdError::InvalidKey)?;
        // A small-order ("weak") key has no real owner: a signature made of the identity and zero verifies
        // under it for every message. Nothing verifies under such a key, so nobody attaches as it.
        if key.is_weak() {
            return Err(PeerIdError::InvalidKey);
        }
        let signature = Signature::from_slice(signature)
            .map_err(|_| PeerIdError::BadSignatureLength(signature.len()))?;
        // Strict: also refuses non-canonical and small-order signature parts, so one signature never verifies
        // for more than the message it was made for.
        key.verify_strict(message, &signature)
            .map_err(|_| PeerIdError::BadSignature)
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // On the stack: peer ids are written for every message a super peer forwards.
        let mut body = [0u8; BODY_LEN];
        BASE32_LOWER.encode_mut(&self.0, &mut body);
        f.write_str(PEER_ID_PREFIX)?;
        f.write_str(std::str::from_utf8(&body).expect("base32 is ASCII"))
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Short form for logs: the prefix and the first 10 characters are unique enough to read.
        let text = self.to_string();
        write!(f, "PeerId({})", &text[..13])
    }
}

impl FromStr for PeerId {
    type Err = PeerIdError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let body = text
            .strip_prefix(PEER_ID_PREFIX)
            .ok_or(PeerIdError::BadPrefix)?;
        // A well-formed body decodes on the stack; anything else takes the general path for its error.
        if BASE32_LOWER.decode_len(body.len()) == Ok(32) {
            let mut key = [0u8; 32];
            BASE32_LOWER
                .decode_mut(body.as_bytes(), &mut key)
                .map_err(|partial| partial.error)?;
            return Self::from_public_key_bytes(&key);
        }
        let bytes = BASE32_LOWER.decode(body.as_bytes())?;
        Self::from_public_key_bytes(&bytes)
    }
}

/// An Ed25519 key pair.
#[derive(Clone)]
pub struct Keypair(SigningKey);

impl Keypair {
    /// Generates a new key pair from the operating system's random source.
    pub fn generate() -> Self {
        Self(SigningKey::from_bytes(&rand::random::<[u8; 32]>()))
    }

    /// Builds a key pair from its 32-byte secret seed.
    pub fn from_secret_bytes(secret: [u8; 32]) -> Self {
        Self(SigningKey::from_bytes(&secret))
    }

    /// The 32-byte secret seed.
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// This key's `PeerId`.
    pub fn peer_id(&self) -> PeerId {
        PeerId(self.0.verifying_key().to_bytes())
    }

    /// Signs `message`, returning the 64-byte signature.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }

    /// Loads a key from `path` (64 hex characters of secret seed), or creates one there with mode 0600 if the file
    /// does not exist.
    pub fn load_or_generate(path: &Path) -> std::io::Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::from_hex(text.trim()).map_err(|reason| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("key file {}: {reason}", path.display()),
                )
            }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let key = Self::generate();
                match key.save(path) {
                    Ok(()) => Ok(key),
                    // Another process (say `leafpeer id` beside `leafpeer listen`) created the key at the same
                    // moment: both use that one. `save` publishes only a complete file, so it reads whole.
                    Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                        Self::load_or_generate(path)
                    }
                    Err(error) => Err(error),
                }
            }
            Err(error) => Err(error),
        }
    }

    /// Writes the secret seed as hex to `path` with mode 0600, creating parent folders.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let text = format!("{}\n", data_encoding::HEXLOWER.encode(&self.secret_bytes()));
        // Written whole to a file of its own, then linked into place: `path` never holds a partial key, and a
        // key already there is never replaced (the link fails with AlreadyExists).
        let temporary = path.with_extension(format!(
            "tmp-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let written = (|| {
            use std::io::Write;
            let mut file = options.open(&temporary)?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            std::fs::hard_link(&temporary, path)
        })();
        let _ = std::fs::remove_file(&temporary);
        written
    }

    fn from_hex(text: &str) -> Result<Self, String> {
        let bytes = data_encoding::HEXLOWER_PERMISSIVE
            .decode(text.as_bytes())
            .map_err(|error| format!("not hex: {error}"))?;
        let secret: [u8; 32] = bytes.try_into().map_err(|bytes: Vec<u8>| {
            format!("expected 32 bytes of secret, got {}", bytes.len())
        })?;
        Ok(Self::from_secret_bytes(secret))
    }
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        write!(f, "Keypair({:?})", self.peer_id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_id_text_round_trips() {
        let key = Keypair::generate();
        let id = key.peer_id();
        let text = id.to_string();
        assert!(text.starts_with("vp1"));
        assert_eq!(text.len(), 55);
        assert_eq!(text.parse::<PeerId>().unwrap(), id);
        // The same text as RFC 4648 base32 in lowercase, and uppercase reads too.
        let rfc = data_encoding::BASE32_NOPAD.encode(&id.0).to_lowercase();
        assert_eq!(text, format!("vp1{rfc}"));
        assert_eq!(
            format!("vp1{}", rfc.to_uppercase())
                .parse::<PeerId>()
                .unwrap(),
            id
        );
    }

    /// Several processes (here threads) asking for the same new key file at once all get the one key that was
    /// written; before, the losers failed with "File exists" or could read a half-written file.
    #[test]
    fn concurrent_first_uses_of_a_key_file_agree_on_one_key() {
        for round in 0..20 {
            let dir = std::env::temp_dir().join(format!(
                "vesper-key-{}-{round}-{:x}",
                std::process::id(),
                rand::random::<u64>()
            ));
            let path = dir.join("leaf.key");
            let ids: Vec<PeerId> = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..4)
                    .map(|_| scope.spawn(|| Keypair::load_or_generate(&path).unwrap().peer_id()))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert!(ids.iter().all(|id| *id == ids[0]), "round {round}: {ids:?}");
            assert_eq!(Keypair::load_or_generate(&path).unwrap().peer_id(), ids[0]);
            let leftovers = std::fs::read_dir(&dir).unwrap().count();
            assert_eq!(leftovers, 1, "only the key file remains");
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn peer_id_is_stable_for_a_key() {
        let key = Keypair::from_secret_bytes([7; 32]);
        assert_eq!(key.peer_id().to_string(), key.peer_id().to_string());
        assert_eq!(Keypair::from_secret_bytes([7; 32]).peer_id(), key.peer_id());
    }

    #[test]
    fn bad_peer_ids_are_rejected() {
        assert!(matches!(
            "xx1abc".parse::<PeerId>(),
            Err(PeerIdError::BadPrefix)
        ));
        assert!(matches!(
            "vp1!!".parse::<PeerId>(),
            Err(PeerIdError::BadEncoding(_))
        ));
        assert!(matches!(
            "vp1aaaa".parse::<PeerId>(),
            Err(PeerIdError::BadKeyLength(_))
        ));
        // 52 characters carry 260 bits for 256: the last 4 must be zero, so a key has one text form only.
        let text = Keypair::generate().peer_id().to_string();
        let (head, last) = text.split_at(54);
        let other = match last {
            "a" => "b",
            "q" => "r",
            other => panic!("last character {other:?} has trailing bits"),
        };
        assert!(matches!(
            format!("{head}{other}").parse::<PeerId>(),
            Err(PeerIdError::BadEncoding(_))
        ));
    }

    #[test]
    fn nothing_verifies_under_small_order_or_invalid_keys() {
        // The identity point: under it, (R = identity, s = 0) would verify for every message.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let mut forged = [0u8; 64];
        forged[..32].copy_from_slice(&identity);
        let weak = PeerId::from_public_key_bytes(&identity).expect("32 bytes name a peer");
        assert!(matches!(
            weak.verify(b"any message", &forged),
            Err(PeerIdError::InvalidKey)
        ));
        // Not a curve point at all (y = 2 has no x on the curve): also refused when it would sign.
        let mut off_curve = [0u8; 32];
        off_curve[0] = 2;
        let off_curve = PeerId::from_public_key_bytes(&off_curve).expect("32 bytes name a peer");
        assert!(matches!(
            off_curve.verify(b"any message", &forged),
            Err(PeerIdError::InvalidKey)
        ));
    }

    #[test]
    fn signatures_verify_only_for_the_signer_and_message() {
        let key = Keypair::generate();
        let other = Keypair::generate();
        let signature = key.sign(b"hello");
        key.peer_id().verify(b"hello", &signature).unwrap();
        assert!(key.peer_id().verify(b"hellO", &signature).is_err());
        assert!(other.peer_id().verify(b"hello", &signature).is_err());
        assert!(matches!(
            key.peer_id().verify(b"hello", &signature[..10]),
            Err(PeerIdError::BadSignatureLength(10))
        ));
    }

    #[test]
    fn key_file_round_trips() {
        let dir = std::env::temp_dir().join(format!("vesper-key-{}", rand::random::<u64>()));
        let path = dir.join("key");
        let created = Keypair::load_or_generate(&path).unwrap();
        let loaded = Keypair::load_or_generate(&path).unwrap();
        assert_eq!(created.peer_id(), loaded.peer_id());
        std::fs::remove_dir_all(dir).unwrap();
    }
}

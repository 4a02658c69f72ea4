//! Encryption at rest for account numbers: AES-256-GCM, a key id stored with every value so
//! keys can be rotated, and the partner id bound as associated data so a ciphertext copied
//! onto another partner's row does not decrypt.
//!
//! Keys are 32 random bytes, base64. `PAYOUTS_PII_KEY` or the key file may hold several,
//! separated by commas, whitespace or newlines: the first seals, all of them open. To rotate,
//! put a new key first and keep the old ones until every stored value has been re-sealed.

use std::collections::HashMap;
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::domain::PartnerId;
use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{Aead, KeyInit, Nonce, Payload};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rand::{RngCore as _, TryRngCore as _};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Bytes of an AES-256 key.
pub const KEY_LEN: usize = 32;
/// Bytes of a GCM nonce, stored in front of the ciphertext.
pub const NONCE_LEN: usize = 12;
/// Bytes of the GCM tag, stored at the end of the ciphertext.
pub const TAG_LEN: usize = 16;

/// An encrypted value as stored: which key sealed it, and `nonce || ciphertext || tag`.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    pub key_id: String,
    pub ciphertext: Vec<u8>,
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealed")
            .field("key_id", &self.key_id)
            .field("ciphertext_len", &self.ciphertext.len())
            .finish()
    }
}

impl Sealed {
    /// One text column's worth: `<key_id>:<base64 of nonce||ciphertext||tag>`.
    pub fn encode(&self) -> String {
        let mut s = String::with_capacity(
            self.key_id.len() + 1 + base64::encoded_len(self.ciphertext.len(), true).unwrap_or(0),
        );
        s.push_str(&self.key_id);
        s.push(':');
        BASE64.encode_string(&self.ciphertext, &mut s);
        s
    }

    /// The inverse of [`Sealed::encode`].
    pub fn decode(s: &str) -> Result<Self, CryptoError> {
        let (key_id, data) = s.split_once(':').ok_or(CryptoError::Malformed)?;
        let ciphertext = BASE64.decode(data).map_err(|_| CryptoError::Malformed)?;
        if key_id.is_empty() {
            return Err(CryptoError::Malformed);
        }
        Ok(Self {
            key_id: key_id.to_owned(),
            ciphertext,
        })
    }
}

/// What can go wrong with keys or ciphertexts. No variant carries key material or plaintext.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("PII key{}: {problem}", origin_suffix(.origin))]
    BadKey {
        origin: Option<PathBuf>,
        problem: String,
    },
    #[error(
        "no PII key: set PAYOUTS_PII_KEY (base64 of 32 random bytes, e.g. `openssl rand -base64 32`) \
         or put one in {}",
        .0.display()
    )]
    NoKey(PathBuf),
    #[error("PII key file {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the operating system's random number generator failed: {0}")]
    Random(String),
    #[error("value was sealed with key {0:?}, which is not loaded")]
    UnknownKey(String),
    #[error("sealed value is malformed")]
    Malformed,
    #[error("sealed value does not open: wrong key, wrong partner, or altered")]
    Unauthentic,
}

fn origin_suffix(origin: &Option<PathBuf>) -> String {
    match origin {
        Some(path) => format!(" in {}", path.display()),
        None => " in PAYOUTS_PII_KEY".to_owned(),
    }
}

/// Seals and opens account numbers. Holds one or more keys; the first loaded seals.
pub struct PiiCipher {
    current: String,
    keys: HashMap<String, Aes256Gcm>,
    order: Vec<String>,
}

impl fmt::Debug for PiiCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PiiCipher")
            .field("current_key_id", &self.current)
            .field("key_ids", &self.order)
            .finish()
    }
}

/// The key id of `key`: the first 8 hex digits of its SHA-256. It names the key without
/// revealing it.
pub fn key_id(key: &[u8]) -> String {
    hex::encode(&Sha256::digest(key)[..4])
}

impl PiiCipher {
    /// A cipher whose only key is `key` (32 bytes).
    pub fn new(key: &[u8; KEY_LEN]) -> Self {
        Self::from_keys(&[*key]).expect("one key")
    }

    /// The first key seals; every key opens. `None` if `keys` is empty.
    fn from_keys(keys: &[[u8; KEY_LEN]]) -> Option<Self> {
        let mut cipher = Self {
            current: key_id(keys.first()?),
            keys: HashMap::new(),
            order: Vec::new(),
        };
        for key in keys {
            let id = key_id(key);
            if !cipher.keys.contains_key(&id) {
                let aes = Aes256Gcm::new_from_slice(key).expect("32 bytes is an AES-256 key");
                cipher.keys.insert(id.clone(), aes);
                cipher.order.push(id);
            }
        }
        Some(cipher)
    }

    /// Keys as in `PAYOUTS_PII_KEY` or the key file: base64, first one current.
    pub fn from_base64(text: &str) -> Result<Self, CryptoError> {
        parse_keys(text, None)
    }

    /// The key from `env_value` (the value of `PAYOUTS_PII_KEY`), else from `key_file`, else,
    /// if `create_if_missing` (local development mode), a fresh random key written to
    /// `key_file` readable by its owner only.
    pub fn from_env_or_file(
        env_value: Option<&str>,
        key_file: &Path,
        create_if_missing: bool,
    ) -> Result<Self, CryptoError> {
        if let Some(value) = env_value.filter(|v| !v.trim().is_empty()) {
            return parse_keys(value, None);
        }
        match read_key_file(key_file) {
            Ok(text) => parse_keys(&text, Some(key_file)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create_if_missing => {
                create_key_file(key_file)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(CryptoError::NoKey(key_file.to_owned()))
            }
            Err(source) => Err(CryptoError::Io {
                path: key_file.to_owned(),
                source,
            }),
        }
    }

    /// The id stored with every newly sealed value.
    pub fn current_key_id(&self) -> &str {
        &self.current
    }

    /// Every loaded key id, the current one first.
    pub fn key_ids(&self) -> &[String] {
        &self.order
    }

    /// Encrypts `plaintext` for `partner_id` under the current key, with a fresh random nonce.
    pub fn seal(&self, partner_id: PartnerId, plaintext: &str) -> Sealed {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let aes = &self.keys[&self.current];
        let body = aes
            .encrypt(
                &Nonce::<Aes256Gcm>::from(nonce),
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: partner_id.as_uuid().as_bytes(),
                },
            )
            // GCM refuses only messages longer than 64 GiB.
            .expect("AES-GCM encrypts any account number");
        let mut ciphertext = Vec::with_capacity(NONCE_LEN + body.len());
        ciphertext.extend_from_slice(&nonce);
        ciphertext.extend_from_slice(&body);
        Sealed {
            key_id: self.current.clone(),
            ciphertext,
        }
    }

    /// Decrypts a value sealed for `partner_id`; fails if it was sealed for anyone else.
    pub fn open(&self, partner_id: PartnerId, sealed: &Sealed) -> Result<String, CryptoError> {
        let aes = self
            .keys
            .get(&sealed.key_id)
            .ok_or_else(|| CryptoError::UnknownKey(sealed.key_id.clone()))?;
        if sealed.ciphertext.len() < NONCE_LEN + TAG_LEN {
            return Err(CryptoError::Malformed);
        }
        let (nonce, body) = sealed.ciphertext.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| CryptoError::Malformed)?;
        let plain = Zeroizing::new(
            aes.decrypt(
                &Nonce::<Aes256Gcm>::from(nonce),
                Payload {
                    msg: body,
                    aad: partner_id.as_uuid().as_bytes(),
                },
            )
            .map_err(|_| CryptoError::Unauthentic)?,
        );
        String::from_utf8(plain.to_vec()).map_err(|_| CryptoError::Malformed)
    }

    /// Whether `sealed` should be re-sealed under the current key (rotation).
    pub fn needs_reseal(&self, sealed: &Sealed) -> bool {
        sealed.key_id != self.current
    }

    /// `sealed` (for `partner_id`) opened and sealed again under the current key.
    pub fn reseal(&self, partner_id: PartnerId, sealed: &Sealed) -> Result<Sealed, CryptoError> {
        let plain = Zeroizing::new(self.open(partner_id, sealed)?);
        Ok(self.seal(partner_id, &plain))
    }

    /// The key probe: a known value sealed under the current key. Stored once per database, it
    /// lets a replica check before it serves that its keys open what is stored, even before
    /// any account number is.
    pub fn seal_probe(&self) -> Sealed {
        self.seal(PROBE_PARTNER, PROBE_PLAINTEXT)
    }

    /// Opens a stored key probe: `Ok` if one of these keys sealed it.
    pub fn open_probe(&self, sealed: &Sealed) -> Result<(), CryptoError> {
        if self.open(PROBE_PARTNER, sealed)? == PROBE_PLAINTEXT {
            Ok(())
        } else {
            Err(CryptoError::Unauthentic)
        }
    }

    /// Which of `key_ids` (those stored values are sealed under) are not loaded: each once, in
    /// order.
    pub fn missing_keys<'a>(&self, key_ids: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        let mut missing: Vec<String> = Vec::new();
        for id in key_ids {
            if !self.keys.contains_key(id) && !missing.iter().any(|m| m == id) {
                missing.push(id.to_owned());
            }
        }
        missing
    }
}

/// What the key probe seals. Not secret: it only has to open.
const PROBE_PLAINTEXT: &str = "partner-payouts account-number key probe";

/// The partner a probe is bound to: none (the nil id), so no partner's sealed account number
/// opens as the probe, nor the probe as an account number.
pub const PROBE_PARTNER: PartnerId = PartnerId::from_uuid(uuid::Uuid::nil());

fn parse_keys(text: &str, source: Option<&Path>) -> Result<PiiCipher, CryptoError> {
    let bad = |problem: String| CryptoError::BadKey {
        origin: source.map(Path::to_owned),
        problem,
    };
    let mut keys = Vec::new();
    let entries = text
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .flat_map(|line| line.split(|c: char| c == ',' || c.is_whitespace()))
        .filter(|entry| !entry.is_empty());
    for (i, entry) in entries.enumerate() {
        let bytes = Zeroizing::new(
            BASE64
                .decode(entry)
                .map_err(|_| bad(format!("key {} is not base64", i + 1)))?,
        );
        let key: [u8; KEY_LEN] = bytes.as_slice().try_into().map_err(|_| {
            bad(format!(
                "key {} is {} bytes; AES-256 needs {KEY_LEN}",
                i + 1,
                bytes.len()
            ))
        })?;
        keys.push(key);
    }
    let cipher = PiiCipher::from_keys(&keys).ok_or_else(|| bad("no key found".to_owned()));
    for key in &mut keys {
        zeroize::Zeroize::zeroize(key);
    }
    cipher
}

fn read_key_file(path: &Path) -> std::io::Result<String> {
    let text = std::fs::read_to_string(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(path)?.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{:o}", mode & 0o777),
                "the PII key file is readable by other users; chmod 600 it"
            );
        }
    }
    Ok(text)
}

fn create_key_file(path: &Path) -> Result<PiiCipher, CryptoError> {
    let io = |source| CryptoError::Io {
        path: path.to_owned(),
        source,
    };
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    rand::rngs::OsRng
        .try_fill_bytes(key.as_mut_slice())
        .map_err(|e| CryptoError::Random(e.to_string()))?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let mut options = std::fs::OpenOptions::new();
    // create_new: never overwrite a key something else just wrote; values sealed with it
    // would be lost.
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = match options.open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let text = read_key_file(path).map_err(io)?;
            return parse_keys(&text, Some(path));
        }
        Err(e) => return Err(io(e)),
    };
    let encoded = Zeroizing::new(BASE64.encode(key.as_slice()));
    file.write_all(
        format!(
            "# AES-256 key for account numbers at rest (local development). Keep it: values\n\
             # sealed with it cannot be read without it.\n{}\n",
            encoded.as_str()
        )
        .as_bytes(),
    )
    .and_then(|()| file.sync_all())
    .map_err(io)?;
    tracing::warn!(
        path = %path.display(),
        key_id = %key_id(key.as_slice()),
        "created a new PII key file for local development"
    );
    Ok(PiiCipher::new(&key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> [u8; KEY_LEN] {
        [byte; KEY_LEN]
    }

    #[test]
    fn seal_then_open_round_trips() {
        let cipher = PiiCipher::new(&key(7));
        let partner = PartnerId::new();
        let sealed = cipher.seal(partner, "110-123-456789");
        assert_eq!(sealed.key_id, key_id(&key(7)));
        assert_eq!(sealed.key_id.len(), 8);
        assert_eq!(
            sealed.ciphertext.len(),
            NONCE_LEN + "110-123-456789".len() + TAG_LEN
        );
        assert!(
            !sealed.ciphertext.windows(6).any(|w| w == b"456789"),
            "the plaintext does not show through"
        );
        assert_eq!(
            cipher.open(partner, &sealed).expect("opens"),
            "110-123-456789"
        );
        let again = cipher.seal(partner, "110-123-456789");
        assert_ne!(
            again.ciphertext, sealed.ciphertext,
            "fresh nonce every time"
        );
        let decoded = Sealed::decode(&sealed.encode()).expect("decodes");
        assert_eq!(decoded, sealed);
    }

    #[test]
    fn the_encoded_form_is_the_key_id_a_colon_and_padded_base64() {
        for len in 0..40 {
            let sealed = Sealed {
                key_id: "k2026".into(),
                ciphertext: (0..len).map(|b| (b * 37 % 256) as u8).collect(),
            };
            let encoded = sealed.encode();
            assert_eq!(
                encoded,
                format!("k2026:{}", BASE64.encode(&sealed.ciphertext)),
                "{len} bytes"
            );
            assert_eq!(Sealed::decode(&encoded).expect("decodes"), sealed);
        }
    }

    #[test]
    fn another_partner_cannot_open_it() {
        let cipher = PiiCipher::new(&key(7));
        let sealed = cipher.seal(PartnerId::new(), "110-123-456789");
        assert!(matches!(
            cipher.open(PartnerId::new(), &sealed),
            Err(CryptoError::Unauthentic)
        ));
    }

    #[test]
    fn altered_or_truncated_ciphertexts_do_not_open() {
        let cipher = PiiCipher::new(&key(7));
        let partner = PartnerId::new();
        let mut sealed = cipher.seal(partner, "110-123-456789");
        let last = sealed.ciphertext.len() - 1;
        sealed.ciphertext[last] ^= 1;
        assert!(matches!(
            cipher.open(partner, &sealed),
            Err(CryptoError::Unauthentic)
        ));
        sealed.ciphertext.truncate(NONCE_LEN + 3);
        assert!(matches!(
            cipher.open(partner, &sealed),
            Err(CryptoError::Malformed)
        ));
        assert!(matches!(
            Sealed::decode("no-colon-here"),
            Err(CryptoError::Malformed)
        ));
    }

    #[test]
    fn rotation_seals_with_the_first_key_and_opens_with_any() {
        let partner = PartnerId::new();
        let old = PiiCipher::new(&key(1));
        let sealed_old = old.seal(partner, "12345678");
        let both = PiiCipher::from_base64(&format!(
            "{},{}",
            BASE64.encode(key(2)),
            BASE64.encode(key(1))
        ))
        .expect("two keys");
        assert_eq!(both.current_key_id(), key_id(&key(2)));
        assert_eq!(both.key_ids(), [key_id(&key(2)), key_id(&key(1))]);
        assert_eq!(
            both.open(partner, &sealed_old).expect("old key"),
            "12345678"
        );
        assert!(both.needs_reseal(&sealed_old));
        let sealed_new = both.seal(partner, "12345678");
        assert_eq!(sealed_new.key_id, key_id(&key(2)));
        assert!(!both.needs_reseal(&sealed_new));
        assert!(matches!(
            old.open(partner, &sealed_new),
            Err(CryptoError::UnknownKey(_))
        ));
    }

    #[test]
    fn the_probe_opens_with_the_key_that_sealed_it_and_no_other() {
        let old = PiiCipher::new(&key(1));
        let probe = old.seal_probe();
        assert!(old.open_probe(&probe).is_ok());
        let rotated = PiiCipher::from_base64(&format!(
            "{},{}",
            BASE64.encode(key(2)),
            BASE64.encode(key(1))
        ))
        .expect("two keys");
        assert!(rotated.open_probe(&probe).is_ok(), "an older key opens it");
        let resealed = rotated.reseal(PROBE_PARTNER, &probe).expect("reseals");
        assert_eq!(resealed.key_id, key_id(&key(2)));
        assert!(rotated.open_probe(&resealed).is_ok());
        assert!(matches!(
            old.open_probe(&resealed),
            Err(CryptoError::UnknownKey(id)) if id == key_id(&key(2))
        ));
        // An account number is not a probe, even under the right key.
        let account = old.seal(PROBE_PARTNER, "110-123-456789");
        assert!(matches!(
            old.open_probe(&account),
            Err(CryptoError::Unauthentic)
        ));
    }

    #[test]
    fn missing_keys_are_those_in_use_that_are_not_loaded() {
        let cipher = PiiCipher::new(&key(1));
        let loaded = key_id(&key(1));
        let other = key_id(&key(2));
        assert!(cipher.missing_keys([loaded.as_str()]).is_empty());
        assert_eq!(
            cipher.missing_keys([other.as_str(), loaded.as_str(), other.as_str()]),
            [other.as_str()]
        );
    }

    #[test]
    fn bad_keys_are_refused_without_showing_them() {
        let short = BASE64.encode([9u8; 16]);
        let err = PiiCipher::from_base64(&short)
            .expect_err("16 bytes")
            .to_string();
        assert!(err.contains("16 bytes"), "{err}");
        assert!(!err.contains(&short), "{err}");
        let err = PiiCipher::from_base64("not base64!")
            .expect_err("junk")
            .to_string();
        assert!(
            err.contains("not base64") && err.contains("PAYOUTS_PII_KEY"),
            "{err}"
        );
        assert!(PiiCipher::from_base64("  ").is_err());
    }

    #[test]
    fn debug_never_shows_key_material() {
        let k = key(0xAB);
        let shown = format!("{:?}", PiiCipher::new(&k));
        assert!(shown.contains(&key_id(&k)), "{shown}");
        assert!(!shown.to_lowercase().contains("abab"), "{shown}");
        assert!(!shown.contains(&BASE64.encode(k)), "{shown}");
    }

    #[test]
    fn env_wins_over_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("pii.key");
        std::fs::write(&file, BASE64.encode(key(1))).expect("write");
        let env = BASE64.encode(key(2));
        let cipher = PiiCipher::from_env_or_file(Some(&env), &file, false).expect("env key");
        assert_eq!(cipher.current_key_id(), key_id(&key(2)));
        let cipher = PiiCipher::from_env_or_file(None, &file, false).expect("file key");
        assert_eq!(cipher.current_key_id(), key_id(&key(1)));
        let cipher = PiiCipher::from_env_or_file(Some(""), &file, false).expect("empty env");
        assert_eq!(cipher.current_key_id(), key_id(&key(1)));
    }

    #[test]
    fn a_missing_key_is_an_error_unless_creation_is_allowed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("data").join("pii.key");
        let err = PiiCipher::from_env_or_file(None, &file, false).expect_err("no key");
        assert!(matches!(err, CryptoError::NoKey(_)), "{err}");
        assert!(err.to_string().contains("PAYOUTS_PII_KEY"), "{err}");

        let created = PiiCipher::from_env_or_file(None, &file, true).expect("created");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&file)
                .expect("exists")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "owner-only, got {mode:o}");
        }
        // The next start reads the same key back, and values survive.
        let partner = PartnerId::new();
        let sealed = created.seal(partner, "987654321");
        let reread = PiiCipher::from_env_or_file(None, &file, true).expect("read back");
        assert_eq!(reread.current_key_id(), created.current_key_id());
        assert_eq!(reread.open(partner, &sealed).expect("opens"), "987654321");
    }
}

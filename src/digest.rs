//! The `Digest` newtype: the only way a digest string becomes a path.

use std::fmt;
use std::str::FromStr;

/// Why a digest string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid digest {input:?}: {reason}")]
pub struct DigestError {
    /// The refused input (truncated to 100 characters).
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// A validated `sha256:<64 lowercase hex>` digest; cheap to clone.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Digest(std::sync::Arc<str>);

// The hex is already uniformly distributed: 64 bits of it make a good hash
// at a fraction of the cost of hashing the whole string (equality still
// compares all of it).
impl std::hash::Hash for Digest {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0.as_bytes()[7..15]);
        state.write_u64(u64::from_le_bytes(b));
    }
}

impl Digest {
    /// Parses and validates a digest string. Only sha256 is accepted.
    pub fn parse(s: &str) -> Result<Self, DigestError> {
        let err = |reason| DigestError {
            input: s.chars().take(100).collect(),
            reason,
        };
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| err("only sha256:<hex> digests are supported"))?;
        if hex.len() != 64 {
            return Err(err("a sha256 digest has 64 hex characters"));
        }
        if !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(err("a sha256 digest is lowercase hex"));
        }
        Ok(Digest(s.into()))
    }

    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        use sha2::Digest as _;
        Self::from_sha256(sha2::Sha256::digest(data).into())
    }

    /// Builds a digest from a finished sha256 hash.
    pub fn from_sha256(hash: [u8; 32]) -> Self {
        Digest(format!("sha256:{}", hex::encode(hash)).into())
    }

    /// The 64 hex characters: a safe file name.
    pub fn hex(&self) -> &str {
        &self.0[7..]
    }

    /// The full `sha256:<hex>` string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The path of this blob relative to the layout root.
    pub fn blob_path(&self) -> std::path::PathBuf {
        std::path::Path::new("blobs")
            .join("sha256")
            .join(self.hex())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", self.0)
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_valid() {
        let d = Digest::of(b"hello");
        assert_eq!(
            d.as_str(),
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(Digest::parse(d.as_str()).unwrap(), d);
    }

    #[test]
    fn refuses_traversal_and_junk() {
        for bad in [
            "sha256:../../x",
            "sha512:aa",
            "",
            "sha256:",
            "sha256:2CF24DBA5FB0A30E26E83B2AC5B9E29E1B161E5C1FA7425E73043362938B9824",
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b982/",
        ] {
            assert!(Digest::parse(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn never_panics_and_never_escapes(s in ".{0,80}") {
            if let Ok(d) = Digest::parse(&s) {
                let p = d.blob_path();
                prop_assert_eq!(p.components().count(), 3);
                prop_assert!(d.hex().bytes().all(|b| b.is_ascii_hexdigit()));
            }
        }

        #[test]
        fn hex_strings_roundtrip(h in "[0-9a-f]{64}") {
            let s = format!("sha256:{h}");
            let d = Digest::parse(&s).unwrap();
            prop_assert_eq!(d.hex(), h.as_str());
        }
    }
}

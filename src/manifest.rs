//! Reading manifests and indexes for what they reference. Manifests are
//! never re-serialized: this module only looks into the bytes.

use serde::Deserialize;
use serde_json::Value;

use crate::digest::Digest;
use crate::layout::MAX_MANIFEST_SIZE;

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker schema 2 manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker schema 1 signed manifest.
pub const DOCKER_V1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
/// Docker schema 1 manifest.
pub const DOCKER_V1: &str = "application/vnd.docker.distribution.manifest.v1+json";

/// The media types asked for when pulling a manifest.
pub const ACCEPTED: &[&str] = &[
    OCI_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST,
    DOCKER_LIST,
    DOCKER_V1_SIGNED,
    DOCKER_V1,
];

/// Why a manifest could not be read.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ManifestError {
    /// Too large to be a manifest.
    #[error("manifest {digest} is {size} bytes, over the 4 MiB limit")]
    TooLarge {
        /// The manifest.
        digest: Digest,
        /// Its size.
        size: usize,
    },
    /// Not JSON, or not the shape its media type promises.
    #[error("manifest {digest} is not valid: {reason}")]
    Invalid {
        /// The manifest.
        digest: Digest,
        /// What is wrong.
        reason: String,
    },
}

/// A blob or manifest a manifest points to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// The target's digest.
    pub digest: Digest,
    /// The declared size (absent for schema 1 layers).
    pub size: Option<u64>,
    /// The declared media type.
    pub media_type: String,
}

/// What a manifest is, and what it references.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// The media type (declared, or inferred from the shape).
    pub media_type: String,
    /// Child manifests, for an index or manifest list.
    pub children: Vec<Reference>,
    /// Config and layers, for an image manifest.
    pub blobs: Vec<Reference>,
}

impl Parsed {
    /// True for an index or manifest list.
    pub fn is_index(&self) -> bool {
        !self.children.is_empty() || self.media_type == OCI_INDEX || self.media_type == DOCKER_LIST
    }
}

#[derive(Deserialize)]
struct RawDesc {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: i64,
}

#[derive(Deserialize)]
struct RawManifest {
    #[serde(rename = "schemaVersion")]
    schema_version: Option<i64>,
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<RawDesc>,
    #[serde(default)]
    layers: Option<Vec<RawDesc>>,
    #[serde(default)]
    manifests: Option<Vec<RawDesc>>,
    #[serde(rename = "fsLayers", default)]
    fs_layers: Option<Vec<Value>>,
    /// OCI artifact manifests (image-spec 1.1 rc) list their content here.
    #[serde(default)]
    blobs: Option<Vec<RawDesc>>,
}

/// Sizes above this are refused as absurd (1 TiB).
const MAX_BLOB_SIZE: i64 = 1 << 40;

/// Parses manifest bytes whose digest is `digest`. `served_type` is the
/// Content-Type the registry gave, when known.
pub fn parse(
    digest: &Digest,
    bytes: &[u8],
    served_type: Option<&str>,
) -> Result<Parsed, ManifestError> {
    if bytes.len() as u64 > MAX_MANIFEST_SIZE {
        return Err(ManifestError::TooLarge {
            digest: digest.clone(),
            size: bytes.len(),
        });
    }
    let invalid = |reason: String| ManifestError::Invalid {
        digest: digest.clone(),
        reason,
    };
    let raw: RawManifest = serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
    let desc = |d: &RawDesc, what: &str| -> Result<Reference, ManifestError> {
        if d.size < 0 || d.size > MAX_BLOB_SIZE {
            return Err(invalid(format!(
                "{what} {} has an absurd size {}",
                d.digest, d.size
            )));
        }
        Ok(Reference {
            digest: Digest::parse(&d.digest).map_err(|e| invalid(format!("{what}: {e}")))?,
            size: Some(d.size as u64),
            media_type: d.media_type.clone(),
        })
    };
    let declared = raw
        .media_type
        .clone()
        .filter(|m| !m.is_empty())
        .or_else(|| served_type.map(|s| s.split(';').next().unwrap_or(s).trim().to_string()));
    if raw.schema_version == Some(1) {
        let mut blobs = Vec::new();
        for (i, l) in raw.fs_layers.unwrap_or_default().iter().enumerate() {
            let sum = l
                .get("blobSum")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid(format!("fsLayers[{i}] has no blobSum")))?;
            let d = Digest::parse(sum).map_err(|e| invalid(format!("fsLayers[{i}]: {e}")))?;
            if !blobs.iter().any(|r: &Reference| r.digest == d) {
                blobs.push(Reference {
                    digest: d,
                    size: None,
                    media_type: String::new(),
                });
            }
        }
        return Ok(Parsed {
            media_type: declared.unwrap_or_else(|| DOCKER_V1_SIGNED.into()),
            children: Vec::new(),
            blobs,
        });
    }
    if let Some(children) = &raw.manifests {
        let children = children
            .iter()
            .enumerate()
            .map(|(i, d)| desc(d, &format!("manifests[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        if children.iter().any(|c| &c.digest == digest) {
            return Err(invalid("index references itself".into()));
        }
        return Ok(Parsed {
            media_type: declared.unwrap_or_else(|| OCI_INDEX.into()),
            children,
            blobs: Vec::new(),
        });
    }
    if let Some(config) = &raw.config {
        let mut blobs = vec![desc(config, "config")?];
        for (i, l) in raw.layers.iter().flatten().enumerate() {
            blobs.push(desc(l, &format!("layers[{i}]"))?);
        }
        return Ok(Parsed {
            media_type: declared.unwrap_or_else(|| OCI_MANIFEST.into()),
            children: Vec::new(),
            blobs,
        });
    }
    if let Some(list) = &raw.blobs {
        let blobs = list
            .iter()
            .enumerate()
            .map(|(i, d)| desc(d, &format!("blobs[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(Parsed {
            media_type: declared
                .unwrap_or_else(|| "application/vnd.oci.artifact.manifest.v1+json".into()),
            children: Vec::new(),
            blobs,
        });
    }
    // Unknown kind of document: kept, not interpreted.
    Ok(Parsed {
        media_type: declared.unwrap_or_else(|| "application/octet-stream".into()),
        children: Vec::new(),
        blobs: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_image_and_index() {
        let cfg = Digest::of(b"cfg");
        let layer = Digest::of(b"layer");
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"mediaType":"c","digest":"{cfg}","size":3}},"layers":[{{"mediaType":"l","digest":"{layer}","size":5}}]}}"#
        );
        let d = Digest::of(m.as_bytes());
        let p = parse(&d, m.as_bytes(), None).unwrap();
        assert_eq!(p.media_type, DOCKER_MANIFEST);
        assert_eq!(p.blobs.len(), 2);
        let idx = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{d}","size":{}}}]}}"#,
            m.len()
        );
        let p = parse(&Digest::of(idx.as_bytes()), idx.as_bytes(), None).unwrap();
        assert_eq!(p.media_type, OCI_INDEX);
        assert!(p.is_index());
        assert_eq!(p.children[0].digest, d);
    }

    #[test]
    fn refuses_hostile() {
        let d = Digest::of(b"x");
        assert!(parse(&d, b"not json", None).is_err());
        let neg = format!(r#"{{"schemaVersion":2,"config":{{"digest":"{d}","size":-1}}}}"#);
        assert!(parse(&d, neg.as_bytes(), None).is_err());
        let trav = r#"{"schemaVersion":2,"config":{"digest":"sha256:../../x","size":1}}"#;
        assert!(parse(&d, trav.as_bytes(), None).is_err());
        let big = vec![b' '; 5 << 20];
        assert!(matches!(
            parse(&d, &big, None),
            Err(ManifestError::TooLarge { .. })
        ));
        let selfref = format!(r#"{{"schemaVersion":2,"manifests":[{{"digest":"{d}","size":1}}]}}"#);
        assert!(parse(&d, selfref.as_bytes(), None).is_err());
    }

    #[test]
    fn artifact_blobs_are_references() {
        let b = Digest::of(b"payload");
        let m = format!(
            r#"{{"mediaType":"application/vnd.oci.artifact.manifest.v1+json","blobs":[{{"mediaType":"x","digest":"{b}","size":7}}]}}"#
        );
        let p = parse(&Digest::of(m.as_bytes()), m.as_bytes(), None).unwrap();
        assert_eq!(p.blobs[0].digest, b);
    }

    #[test]
    fn unknown_kind_kept() {
        let d = Digest::of(b"x");
        let p = parse(
            &d,
            br#"{"schemaVersion":2,"mediaType":"application/x-custom"}"#,
            None,
        )
        .unwrap();
        assert_eq!(p.media_type, "application/x-custom");
        assert!(p.blobs.is_empty() && p.children.is_empty());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&Digest::of(&data), &data, None);
        }

        #[test]
        fn arbitrary_descriptors_stay_in_blobs(digest in ".{0,80}", size in any::<i64>()) {
            let m = serde_json::json!({"schemaVersion":2,"config":{"digest":digest,"size":size},"layers":[]});
            let bytes = serde_json::to_vec(&m).unwrap();
            if let Ok(p) = parse(&Digest::of(&bytes), &bytes, None) {
                for b in p.blobs {
                    prop_assert_eq!(b.digest.blob_path().components().count(), 3);
                }
            }
        }
    }
}

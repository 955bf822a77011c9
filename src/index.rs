//! `index.json`: what the archive holds, as an OCI image index.
//!
//! One descriptor per archived tag event. The current image of a tag
//! (position 0) carries `org.opencontainers.image.ref.name = ns/name:tag`,
//! so `skopeo inspect oci:ARCHIVE:ns/name:tag` works; history items carry
//! the same annotations without a ref name. The ImageStream objects are a
//! blob (an `oc get is -o json` List) named by an annotation of the index
//! itself, so one rename of `index.json` commits one consistent state.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

use crate::digest::Digest;

/// The OCI ref name annotation.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Annotation: namespace of the ImageStream.
pub const ANN_NAMESPACE: &str = "io.imagestream-archiver.namespace";
/// Annotation: name of the ImageStream.
pub const ANN_STREAM: &str = "io.imagestream-archiver.imagestream";
/// Annotation: tag name.
pub const ANN_TAG: &str = "io.imagestream-archiver.tag";
/// Annotation: position in the tag's history (0 = current).
pub const ANN_POSITION: &str = "io.imagestream-archiver.history-index";
/// Annotation: the tag event's `created`.
pub const ANN_CREATED: &str = "io.imagestream-archiver.created";
/// Annotation: the tag event's `dockerImageReference`.
pub const ANN_REFERENCE: &str = "io.imagestream-archiver.docker-image-reference";
/// Annotation on the index: digest of the ImageStream List blob.
pub const ANN_IMAGESTREAMS: &str = "io.imagestream-archiver.imagestreams";

/// One archived tag event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Namespace of the stream.
    pub namespace: String,
    /// Name of the stream.
    pub stream: String,
    /// Tag name.
    pub tag: String,
    /// 0 for the current image, 1.. for history (newest first).
    pub position: usize,
    /// The manifest (or index) digest.
    pub digest: Digest,
    /// The manifest's media type.
    pub media_type: String,
    /// The manifest's size in bytes.
    pub size: u64,
    /// The tag event's `created`.
    pub created: String,
    /// The tag event's `dockerImageReference`.
    pub reference: String,
}

impl Entry {
    /// `ns/name:tag`, the ref name of a current tag.
    pub fn ref_name(&self) -> String {
        format!("{}/{}:{}", self.namespace, self.stream, self.tag)
    }

    /// `ns/name`.
    pub fn stream_key(&self) -> String {
        format!("{}/{}", self.namespace, self.stream)
    }

    fn sort_key(&self) -> (&str, &str, &str, usize) {
        (&self.namespace, &self.stream, &self.tag, self.position)
    }
}

/// The parsed content of `index.json`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ArchiveIndex {
    /// Archived tag events, sorted by namespace, stream, tag, position.
    pub entries: Vec<Entry>,
    /// The blob holding the ImageStream objects (`List` JSON), if any.
    pub imagestreams: Option<Digest>,
    /// Descriptors of other tools (unknown media types, no annotations of
    /// ours): kept as they are.
    pub foreign: Vec<Value>,
}

#[derive(Serialize, Deserialize)]
struct RawIndex {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Vec<Value>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize)]
struct RawDescriptor {
    #[serde(rename = "mediaType")]
    media_type: String,
    digest: Digest,
    size: u64,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

impl ArchiveIndex {
    /// Parses `index.json` bytes.
    pub fn from_json(data: &[u8]) -> Result<Self, String> {
        let raw: RawIndex = serde_json::from_slice(data).map_err(|e| e.to_string())?;
        if raw.schema_version != 2 {
            return Err(format!("schemaVersion {} is not 2", raw.schema_version));
        }
        let mut index = ArchiveIndex {
            imagestreams: raw
                .annotations
                .get(ANN_IMAGESTREAMS)
                .map(|s| Digest::parse(s).map_err(|e| e.to_string()))
                .transpose()?,
            ..Default::default()
        };
        for (i, value) in raw.manifests.into_iter().enumerate() {
            let ours = value
                .get("annotations")
                .and_then(|a| a.get(ANN_NAMESPACE))
                .is_some();
            if !ours {
                index.foreign.push(value);
                continue;
            }
            let d: RawDescriptor =
                serde_json::from_value(value).map_err(|e| format!("manifests[{i}]: {e}"))?;
            let get = |k: &str| d.annotations.get(k).cloned().unwrap_or_default();
            let position = get(ANN_POSITION)
                .parse()
                .map_err(|_| format!("manifests[{i}]: bad {ANN_POSITION}"))?;
            let entry = Entry {
                namespace: get(ANN_NAMESPACE),
                stream: get(ANN_STREAM),
                tag: get(ANN_TAG),
                position,
                digest: d.digest,
                media_type: d.media_type,
                size: d.size,
                created: get(ANN_CREATED),
                reference: get(ANN_REFERENCE),
            };
            if entry.stream.is_empty() || entry.tag.is_empty() {
                return Err(format!("manifests[{i}]: stream or tag annotation missing"));
            }
            index.entries.push(entry);
        }
        index.sort();
        Ok(index)
    }

    /// Sorts entries into their canonical order.
    pub fn sort(&mut self) {
        self.entries.sort_by(|a, b| a.sort_key().cmp(&b.sort_key()));
        self.entries.dedup_by(|a, b| a.sort_key() == b.sort_key());
    }

    /// Serializes to `index.json` bytes, deterministically.
    pub fn to_json(&self) -> Vec<u8> {
        let mut manifests: Vec<Value> = self
            .entries
            .iter()
            .map(|e| {
                let mut ann = Map::new();
                if e.position == 0 {
                    ann.insert(REF_NAME.into(), e.ref_name().into());
                }
                ann.insert(ANN_NAMESPACE.into(), e.namespace.clone().into());
                ann.insert(ANN_STREAM.into(), e.stream.clone().into());
                ann.insert(ANN_TAG.into(), e.tag.clone().into());
                ann.insert(ANN_POSITION.into(), e.position.to_string().into());
                if !e.created.is_empty() {
                    ann.insert(ANN_CREATED.into(), e.created.clone().into());
                }
                if !e.reference.is_empty() {
                    ann.insert(ANN_REFERENCE.into(), e.reference.clone().into());
                }
                serde_json::json!({
                    "mediaType": e.media_type,
                    "digest": e.digest,
                    "size": e.size,
                    "annotations": ann,
                })
            })
            .collect();
        manifests.extend(self.foreign.iter().cloned());
        let mut annotations = BTreeMap::new();
        if let Some(d) = &self.imagestreams {
            annotations.insert(ANN_IMAGESTREAMS.to_string(), d.to_string());
        }
        let raw = RawIndex {
            schema_version: 2,
            media_type: Some(crate::manifest::OCI_INDEX.into()),
            manifests,
            annotations,
        };
        let mut out = serde_json::to_vec_pretty(&raw).expect("index serializes");
        out.push(b'\n');
        out
    }

    /// Every digest the index references directly (entries, foreign
    /// descriptors with a valid digest, the ImageStream blob).
    pub fn roots(&self) -> Vec<Digest> {
        let mut out: Vec<Digest> = self.entries.iter().map(|e| e.digest.clone()).collect();
        for f in &self.foreign {
            if let Some(d) = f.get("digest").and_then(Value::as_str) {
                if let Ok(d) = Digest::parse(d) {
                    out.push(d);
                }
            }
        }
        out.extend(self.imagestreams.clone());
        out.sort();
        out.dedup();
        out
    }

    /// Entries grouped by `ns/name`, then tag, each tag's entries by position.
    pub fn by_stream(&self) -> BTreeMap<String, BTreeMap<String, Vec<&Entry>>> {
        let mut out: BTreeMap<String, BTreeMap<String, Vec<&Entry>>> = BTreeMap::new();
        for e in &self.entries {
            out.entry(e.stream_key())
                .or_default()
                .entry(e.tag.clone())
                .or_default()
                .push(e);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tag: &str, position: usize, data: &[u8]) -> Entry {
        Entry {
            namespace: "ns".into(),
            stream: "app".into(),
            tag: tag.into(),
            position,
            digest: Digest::of(data),
            media_type: crate::manifest::OCI_MANIFEST.into(),
            size: data.len() as u64,
            created: "2026-01-01T00:00:00Z".into(),
            reference: format!("reg/ns/app@{}", Digest::of(data)),
        }
    }

    #[test]
    fn roundtrip_is_stable() {
        let mut idx = ArchiveIndex {
            entries: vec![
                entry("v2", 1, b"b"),
                entry("v1", 0, b"a"),
                entry("v2", 0, b"c"),
            ],
            imagestreams: Some(Digest::of(b"list")),
            foreign: vec![
                serde_json::json!({"mediaType":"x/y","digest":Digest::of(b"z"),"size":1}),
            ],
        };
        idx.sort();
        let json = idx.to_json();
        let back = ArchiveIndex::from_json(&json).unwrap();
        assert_eq!(back, idx);
        assert_eq!(back.to_json(), json);
        let v: Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["manifests"][0]["annotations"][REF_NAME], "ns/app:v1");
        assert!(v["manifests"][2]["annotations"].get(REF_NAME).is_none());
        assert_eq!(back.roots().len(), 5);
    }

    #[test]
    fn rejects_bad_digest_in_index() {
        let bad = br#"{"schemaVersion":2,"manifests":[{"mediaType":"a","digest":"sha256:../../etc","size":1,"annotations":{"io.imagestream-archiver.namespace":"n"}}]}"#;
        assert!(ArchiveIndex::from_json(bad).is_err());
    }
}

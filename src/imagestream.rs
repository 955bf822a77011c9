//! The ImageStream objects of `image.openshift.io/v1`, as far as the archiver
//! reads them, and the parsing of `oc get is -o json` output.
//!
//! Only the fields the archiver needs are typed; everything else is kept in
//! `rest` so that an ImageStream stored in the archive is the object as it was
//! discovered (spec and status), minus nothing.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

use crate::digest::Digest;

/// Errors while reading ImageStream JSON.
#[derive(Debug, thiserror::Error)]
pub enum ImageStreamError {
    /// The file could not be read.
    #[error("cannot read ImageStream file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The JSON is not an ImageStream or a List of them.
    #[error("{origin}: not an ImageStream or a List of ImageStreams: {reason}")]
    Shape {
        /// Where the JSON came from (file name or API path).
        origin: String,
        /// What was wrong.
        reason: String,
    },
}

/// Object metadata: the fields the archiver reads, the rest kept verbatim.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ObjectMeta {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    #[serde(default)]
    pub namespace: String,
    /// Labels, for `--selector` on offline input.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Server bookkeeping, not kept: it can outweigh the object itself and a
    /// restore never sends it back.
    #[serde(rename = "managedFields", default, skip_serializing)]
    pub managed_fields: Option<serde::de::IgnoredAny>,
    /// Every other metadata field, as served.
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

/// One ImageStream (`image.openshift.io/v1`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageStream {
    /// `apiVersion`, normally `image.openshift.io/v1`.
    #[serde(rename = "apiVersion", default = "default_api_version")]
    pub api_version: String,
    /// `kind`, normally `ImageStream`.
    #[serde(default = "default_kind")]
    pub kind: String,
    /// Object metadata.
    pub metadata: ObjectMeta,
    /// The desired state, kept as served (restored with `--apply-imagestreams`).
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub spec: Value,
    /// The observed state: repository names and tag histories.
    #[serde(default)]
    pub status: ImageStreamStatus,
}

fn default_api_version() -> String {
    "image.openshift.io/v1".into()
}
fn default_kind() -> String {
    "ImageStream".into()
}

/// `status` of an ImageStream.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ImageStreamStatus {
    /// e.g. `image-registry.openshift-image-registry.svc:5000/ns/name`.
    #[serde(
        rename = "dockerImageRepository",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub docker_image_repository: String,
    /// The route's name for the repository, when exposed.
    #[serde(
        rename = "publicDockerImageRepository",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub public_docker_image_repository: Option<String>,
    /// One entry per tag with its history, newest first.
    #[serde(default, deserialize_with = "null_as_default")]
    pub tags: Vec<NamedTagEventList>,
    /// Other status fields, as served.
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

/// `status.tags[]`: a tag and its events, newest first.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NamedTagEventList {
    /// The tag name.
    pub tag: String,
    /// Tag events; `items[0]` is the current image.
    #[serde(default, deserialize_with = "null_as_default")]
    pub items: Vec<TagEvent>,
    /// Conditions and anything else, as served.
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

/// One tag event (`status.tags[].items[]`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TagEvent {
    /// When the tag pointed at this image (RFC 3339).
    #[serde(default)]
    pub created: String,
    /// Pull spec the image was recorded with.
    #[serde(rename = "dockerImageReference", default)]
    pub docker_image_reference: String,
    /// The manifest (or manifest list) digest.
    #[serde(default)]
    pub image: String,
    /// The spec generation that produced this event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

impl ImageStream {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.metadata.namespace, self.metadata.name)
    }
}

/// One image to archive: a tag event of a stream, with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// Namespace of the stream (shared by all refs of the stream).
    pub namespace: std::sync::Arc<str>,
    /// Name of the stream (shared).
    pub stream: std::sync::Arc<str>,
    /// Tag name (shared by the tag's events).
    pub tag: std::sync::Arc<str>,
    /// 0 for the current image, 1.. for history, newest first.
    pub position: usize,
    /// The manifest digest.
    pub digest: Digest,
    /// The tag event's `created`.
    pub created: String,
    /// The tag event's `dockerImageReference`.
    pub docker_image_reference: String,
}

/// A tag event that could not be turned into an [`ImageRef`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadTagEvent {
    /// `ns/name:tag` and position.
    pub what: String,
    /// Why.
    pub reason: String,
}

/// Every image a stream references: each tag's current image and history.
pub fn images_of(is: &ImageStream) -> (Vec<ImageRef>, Vec<BadTagEvent>) {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    let namespace: std::sync::Arc<str> = is.metadata.namespace.as_str().into();
    let stream: std::sync::Arc<str> = is.metadata.name.as_str().into();
    for tag in &is.status.tags {
        let tag_name: std::sync::Arc<str> = tag.tag.as_str().into();
        for (position, item) in tag.items.iter().enumerate() {
            match Digest::parse(&item.image) {
                Ok(digest) => out.push(ImageRef {
                    namespace: namespace.clone(),
                    stream: stream.clone(),
                    tag: tag_name.clone(),
                    position,
                    digest,
                    created: item.created.clone(),
                    docker_image_reference: item.docker_image_reference.clone(),
                }),
                Err(e) => bad.push(BadTagEvent {
                    what: format!("{}:{} item {}", is.key(), tag.tag, position),
                    reason: e.to_string(),
                }),
            }
        }
    }
    (out, bad)
}

/// True when `reference` (a `dockerImageReference`) names an image on `registry`.
pub fn is_on_registry(reference: &str, registry: &str, internal_repo: &str) -> bool {
    let host = internal_repo.split('/').next().unwrap_or_default();
    let starts = |h: &str| !h.is_empty() && reference.starts_with(&format!("{h}/"));
    starts(registry) || starts(host)
}

/// Parses a single ImageStream or a `List` of them (the output of
/// `oc get is -A -o json`). `origin` names the input in errors.
pub fn parse_list(json: &[u8], origin: &str) -> Result<Vec<ImageStream>, ImageStreamError> {
    let shape = |reason: String| ImageStreamError::Shape {
        origin: origin.to_string(),
        reason,
    };
    // Items stay raw (borrowed from the input) until each is parsed into
    // its typed form: no intermediate tree of the whole document.
    #[derive(Deserialize)]
    struct Doc<'a> {
        #[serde(default)]
        kind: String,
        #[serde(borrow, default)]
        items: Option<Vec<&'a serde_json::value::RawValue>>,
    }
    let doc: Doc = serde_json::from_slice(json).map_err(|e| shape(e.to_string()))?;
    let parse_one = |i: usize, raw: &str| -> Result<ImageStream, ImageStreamError> {
        let is: ImageStream =
            serde_json::from_str(raw).map_err(|e| shape(format!("item {i}: {e}")))?;
        if is.kind != "ImageStream" {
            return Err(shape(format!(
                "item {i}: kind {:?} is not ImageStream",
                is.kind
            )));
        }
        if is.metadata.name.is_empty() || is.metadata.namespace.is_empty() {
            return Err(shape(format!(
                "item {i}: metadata.name and metadata.namespace are required"
            )));
        }
        // Names go into API paths, registry URLs and ref names.
        if !crate::index::is_valid_namespace(&is.metadata.namespace)
            || !crate::index::is_valid_stream_name(&is.metadata.name)
        {
            return Err(shape(format!(
                "item {i}: {:?}/{:?} is not a valid namespace/name",
                is.metadata.namespace, is.metadata.name
            )));
        }
        Ok(is)
    };
    match doc.kind.as_str() {
        "ImageStream" => {
            let text = std::str::from_utf8(json).map_err(|e| shape(e.to_string()))?;
            Ok(vec![parse_one(0, text)?])
        }
        "List" | "ImageStreamList" => doc
            .items
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(i, raw)| parse_one(i, raw.get()))
            .collect(),
        other => Err(shape(format!("unexpected kind {other:?}"))),
    }
}

/// Reads [`parse_list`] input from a file.
pub fn read_file(path: &Path) -> Result<Vec<ImageStream>, ImageStreamError> {
    let data = std::fs::read(path).map_err(|source| ImageStreamError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_list(&data, &path.display().to_string())
}

/// Serializes a set of streams as an `oc get is -o json` List, directly
/// (no intermediate tree).
pub fn list_json<'a>(streams: impl IntoIterator<Item = &'a ImageStream>) -> Vec<u8> {
    #[derive(Serialize)]
    struct ListOut<'a> {
        #[serde(rename = "apiVersion")]
        api_version: &'static str,
        kind: &'static str,
        metadata: Value,
        items: Vec<&'a ImageStream>,
    }
    serde_json::to_vec(&ListOut {
        api_version: "v1",
        kind: "List",
        metadata: serde_json::json!({"resourceVersion": ""}),
        items: streams.into_iter().collect(),
    })
    .expect("an ImageStream list serializes")
}

/// Matches a label selector of the form `a=b,c!=d,e` (equality-based only).
pub fn matches_selector(
    labels: &std::collections::BTreeMap<String, String>,
    selector: &str,
) -> bool {
    selector
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .all(|term| {
            if let Some((k, v)) = term.split_once("!=") {
                labels.get(k.trim()).map(String::as_str) != Some(v.trim())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                labels.get(k.trim()).map(String::as_str) == Some(v.trim())
            } else if let Some(k) = term.strip_prefix('!') {
                !labels.contains_key(k.trim())
            } else {
                labels.contains_key(term)
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const REAL: &str = r#"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"image.openshift.io/v1","kind":"ImageStream",
      "metadata":{"name":"app","namespace":"ns","labels":{"team":"a"},"uid":"u","resourceVersion":"1"},
      "spec":{"lookupPolicy":{"local":false},"tags":[{"name":"ext","from":{"kind":"DockerImage","name":"quay.io/x/y:1"},"importPolicy":{"importMode":"Legacy"},"referencePolicy":{"type":"Source"}}]},
      "status":{"dockerImageRepository":"image-registry.openshift-image-registry.svc:5000/ns/app",
        "tags":[{"tag":"latest","items":[
          {"created":"2024-01-02T00:00:00Z","dockerImageReference":"image-registry.openshift-image-registry.svc:5000/ns/app@sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","image":"sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","generation":2},
          {"created":"2024-01-01T00:00:00Z","dockerImageReference":"quay.io/x/y@sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb","image":"sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb","generation":1}]},
          {"tag":"empty","items":null,"conditions":[{"type":"ImportSuccess","status":"False"}]}]}},
      {"apiVersion":"image.openshift.io/v1","kind":"ImageStream","metadata":{"name":"bare","namespace":"ns"}}]}"#;

    #[test]
    fn parses_a_real_list_and_keeps_unknown_fields() {
        let list = parse_list(REAL.as_bytes(), "test").unwrap();
        assert_eq!(list.len(), 2);
        let (refs, bad) = images_of(&list[0]);
        assert!(bad.is_empty());
        assert_eq!(refs.len(), 2);
        assert_eq!(refs[1].position, 1);
        assert!(is_on_registry(
            &refs[0].docker_image_reference,
            "x:5000",
            &list[0].status.docker_image_repository
        ));
        assert!(!is_on_registry(
            &refs[1].docker_image_reference,
            "x:5000",
            &list[0].status.docker_image_repository
        ));
        let back = serde_json::to_value(&list[0]).unwrap();
        assert_eq!(back["metadata"]["uid"], "u");
        assert_eq!(back["spec"]["tags"][0]["from"]["kind"], "DockerImage");
        assert_eq!(
            back["status"]["tags"][1]["conditions"][0]["type"],
            "ImportSuccess"
        );
        assert!(images_of(&list[1]).0.is_empty());
    }

    #[test]
    fn wrong_shapes_are_named_errors() {
        for bad in [
            r#"{"kind":"Pod"}"#,
            r#"{"kind":"List","items":{}}"#,
            r#"{"kind":"List","items":[{"kind":"ImageStream","metadata":{"name":"x","namespace":"y"},"status":{"tags":[{"tag":1}]}}]}"#,
            r#"{"kind":"List","items":[{"kind":"ImageStream","metadata":{"name":"","namespace":"y"}}]}"#,
            r#"{"kind":"List","items":[{"kind":"ImageStream","metadata":{"name":"web/status","namespace":"y"}}]}"#,
            r#"{"kind":"List","items":[{"kind":"ImageStream","metadata":{"name":"x","namespace":"../y"}}]}"#,
            "not json",
        ] {
            let e = parse_list(bad.as_bytes(), "file.json").unwrap_err();
            assert!(e.to_string().contains("file.json"), "{e}");
        }
        let traversal = REAL.replace(
            "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\",\"generation\":2",
            "sha256:../../../etc/passwd\",\"generation\":2",
        );
        let list = parse_list(traversal.as_bytes(), "t").unwrap();
        let (refs, bad) = images_of(&list[0]);
        assert_eq!(refs.len(), 1);
        assert_eq!(bad.len(), 1);
        assert!(bad[0].reason.contains("../"));
    }

    #[test]
    fn selectors() {
        let labels: std::collections::BTreeMap<String, String> =
            [("app".to_string(), "web".to_string())].into();
        assert!(matches_selector(&labels, "app=web"));
        assert!(matches_selector(&labels, "app==web,!tier"));
        assert!(!matches_selector(&labels, "app!=web"));
        assert!(!matches_selector(&labels, "tier"));
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            ".{0,20}".prop_map(Value::from),
            "sha256:[0-9a-f./]{0,70}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 64, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("kind".to_string()),
                        Just("items".to_string()),
                        Just("metadata".to_string()),
                        Just("status".to_string()),
                        Just("tags".to_string()),
                        Just("image".to_string()),
                        Just("name".to_string()),
                        Just("namespace".to_string()),
                        "[a-z]{1,8}",
                    ],
                    inner,
                    0..5
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn arbitrary_json_never_panics_nor_escapes(v in arb_json(), kind in prop_oneof![Just("List"), Just("ImageStream")]) {
            let mut v = v;
            if let Value::Object(m) = &mut v { m.insert("kind".into(), kind.into()); }
            let bytes = serde_json::to_vec(&v).unwrap();
            if let Ok(list) = parse_list(&bytes, "prop") {
                for is in &list {
                    for r in images_of(is).0 {
                        prop_assert_eq!(r.digest.blob_path().components().count(), 3);
                    }
                }
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_list(&data, "prop");
        }
    }
}

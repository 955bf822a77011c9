//! The ImageStream objects of `image.openshift.io/v1`, as far as the archiver
//! reads them, and the parsing of `oc get is -o json` output.
//!
//! Only the fields the archiver needs are typed; everything else is kept in
//! `rest` so that an ImageStream stored in the archive is the object as it was
//! discovered (spec and status), minus nothing.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::digest::Digest;
use crate::jsonfile::{self, JsonFile};

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
///
/// Kept small: a cluster of 10,000 streams has half a million of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// Namespace of the stream (shared by all refs of the stream).
    pub namespace: Arc<str>,
    /// Name of the stream (shared).
    pub stream: Arc<str>,
    /// Tag name (shared by the tag's events).
    pub tag: Arc<str>,
    /// 0 for the current image, 1.. for history, newest first.
    pub position: usize,
    /// The manifest digest.
    pub digest: Digest,
    /// The tag event's `created`.
    pub created: Box<str>,
    /// The stream's `status.dockerImageRepository` (shared).
    pub repository: Arc<str>,
    /// The tag event's `dockerImageReference` when it is not
    /// `<repository>@<digest>` (which is what the registry records).
    other_reference: Option<Box<str>>,
}

impl ImageRef {
    /// True when the tag event names an image on another registry than
    /// `registry` and the cluster's internal one (`--skip-external`).
    pub fn is_external(&self, registry: &str) -> bool {
        match &self.other_reference {
            Some(r) => !r.is_empty() && !is_on_registry(r, registry, &self.repository),
            // `<repository>@<digest>`: a digest holds no `/`, so the
            // repository decides.
            None => !is_on_registry(&self.repository, registry, &self.repository),
        }
    }

    /// The tag event's `dockerImageReference`, as an index entry holds it.
    pub fn index_reference(&self) -> crate::index::Reference {
        match &self.other_reference {
            Some(r) => crate::index::Reference::Text(r.clone()),
            None => crate::index::Reference::At(self.repository.clone()),
        }
    }

    /// The tag event's `dockerImageReference`.
    pub fn docker_image_reference(&self) -> std::borrow::Cow<'_, str> {
        match &self.other_reference {
            Some(r) => std::borrow::Cow::Borrowed(r),
            None => std::borrow::Cow::Owned(format!("{}@{}", self.repository, self.digest)),
        }
    }
}

/// A tag event that could not be turned into an [`ImageRef`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadTagEvent {
    /// `ns/name:tag` and position.
    pub what: String,
    /// Why.
    pub reason: String,
}

/// What a backup needs of one ImageStream: its names, its tag events as
/// [`ImageRef`]s, counts for the report, and (unless it is only planned)
/// the object to archive.
#[derive(Debug, Clone)]
pub struct StreamRecord {
    /// `metadata.namespace`.
    pub namespace: Arc<str>,
    /// `metadata.name`.
    pub name: Arc<str>,
    /// `metadata.labels`, for `--selector` on offline input.
    pub labels: BTreeMap<String, String>,
    /// Tags with at least one event.
    pub tags: usize,
    /// Tag events after each tag's current one.
    pub history_items: usize,
    /// Every tag event with a valid digest, tag by tag, newest first.
    pub refs: Vec<ImageRef>,
    /// Tag events without one.
    pub bad: Vec<BadTagEvent>,
    /// The object as the archive stores it (an [`ImageStream`] serialized:
    /// no `managedFields`), when kept.
    pub object: Option<PackedObject>,
}

/// The fields of an ImageStream a backup reads, borrowed from its JSON.
#[derive(Deserialize)]
struct StreamView<'a> {
    #[serde(borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow)]
    metadata: MetaView<'a>,
    #[serde(borrow, default)]
    status: StatusView<'a>,
}

#[derive(Deserialize)]
struct MetaView<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(borrow, default)]
    namespace: Cow<'a, str>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

impl MetaView<'_> {
    /// [`check_identity`] of a viewed object (`kind` defaults to
    /// ImageStream, as for [`ImageStream`]).
    fn check(&self, kind: Option<&str>) -> Result<(), String> {
        check_identity(kind.unwrap_or("ImageStream"), &self.namespace, &self.name)
    }
}

#[derive(Deserialize, Default)]
struct StatusView<'a> {
    #[serde(rename = "dockerImageRepository", borrow, default)]
    docker_image_repository: Cow<'a, str>,
    #[serde(borrow, default, deserialize_with = "null_as_default")]
    tags: Vec<TagView<'a>>,
}

#[derive(Deserialize)]
struct TagView<'a> {
    #[serde(borrow)]
    tag: Cow<'a, str>,
    #[serde(borrow, default, deserialize_with = "null_as_default")]
    items: Vec<EventView<'a>>,
}

#[derive(Deserialize)]
struct EventView<'a> {
    #[serde(borrow, default)]
    created: Cow<'a, str>,
    #[serde(rename = "dockerImageReference", borrow, default)]
    docker_image_reference: Cow<'a, str>,
    #[serde(borrow, default)]
    image: Cow<'a, str>,
}

/// The checks every ImageStream passes before its names are used: kind,
/// and names fit for API paths, registry URLs and ref names.
fn check_identity(kind: &str, namespace: &str, name: &str) -> Result<(), String> {
    if kind != "ImageStream" {
        return Err(format!("kind {kind:?} is not ImageStream"));
    }
    if name.is_empty() || namespace.is_empty() {
        return Err("metadata.name and metadata.namespace are required".into());
    }
    if !crate::index::is_valid_namespace(namespace) || !crate::index::is_valid_stream_name(name) {
        return Err(format!(
            "{namespace:?}/{name:?} is not a valid namespace/name"
        ));
    }
    Ok(())
}

impl StreamRecord {
    /// Reads one ImageStream's JSON. With `keep_object`, the object itself
    /// is kept too (a full parse); without it only what a plan needs is
    /// read.
    pub fn parse(raw: &str, keep_object: bool) -> Result<Self, String> {
        let view: StreamView = serde_json::from_str(raw).map_err(|e| e.to_string())?;
        view.metadata.check(view.kind.as_deref())?;
        let object = if keep_object {
            let is: ImageStream = serde_json::from_str(raw).map_err(|e| e.to_string())?;
            let json = serde_json::to_string(&is).map_err(|e| e.to_string())?;
            Some(PackedObject::pack(&json)?)
        } else {
            None
        };
        let namespace: Arc<str> = view.metadata.namespace.as_ref().into();
        let name: Arc<str> = view.metadata.name.as_ref().into();
        let repository: Arc<str> = view.status.docker_image_repository.as_ref().into();
        let mut record = StreamRecord {
            labels: view.metadata.labels,
            tags: 0,
            history_items: 0,
            refs: Vec::with_capacity(view.status.tags.iter().map(|t| t.items.len()).sum()),
            bad: Vec::new(),
            object,
            namespace,
            name,
        };
        for tag in &view.status.tags {
            record.tags += usize::from(!tag.items.is_empty());
            record.history_items += tag.items.len().saturating_sub(1);
            if !tag.items.is_empty() && !crate::index::is_valid_tag(&tag.tag) {
                // OpenShift does not check status tag names as a registry
                // does; the archive names its entries by tag, and a name it
                // would refuse on reading must not get into it.
                record.bad.push(BadTagEvent {
                    what: format!("{}/{}:{}", record.namespace, record.name, tag.tag),
                    reason: format!(
                        "{:?} cannot be a registry tag ([A-Za-z0-9_][A-Za-z0-9_.-], at most 128 characters): its {} image(s) are not archived",
                        &*tag.tag,
                        tag.items.len()
                    ),
                });
                continue;
            }
            let tag_name: Arc<str> = tag.tag.as_ref().into();
            for (position, item) in tag.items.iter().enumerate() {
                if item.image.is_empty() && !item.docker_image_reference.is_empty() {
                    // A reference-only tag (`reference: true`, `oc tag
                    // --reference`): the event names an image elsewhere and
                    // no digest; there is nothing to archive but the spec,
                    // which the archived object keeps.
                    continue;
                }
                match Digest::parse(&item.image) {
                    Ok(digest) => {
                        let reference = &*item.docker_image_reference;
                        let derived = !repository.is_empty()
                            && reference
                                .strip_prefix(&*repository)
                                .and_then(|r| r.strip_prefix('@'))
                                .is_some_and(|d| d == item.image);
                        record.refs.push(ImageRef {
                            namespace: record.namespace.clone(),
                            stream: record.name.clone(),
                            tag: tag_name.clone(),
                            position,
                            digest,
                            created: item.created.as_ref().into(),
                            repository: repository.clone(),
                            other_reference: (!derived).then(|| reference.into()),
                        })
                    }
                    Err(e) => record.bad.push(BadTagEvent {
                        what: format!(
                            "{}/{}:{} item {}",
                            record.namespace, record.name, tag.tag, position
                        ),
                        reason: e.to_string(),
                    }),
                }
            }
        }
        Ok(record)
    }

    /// The record of a parsed stream.
    pub fn from_stream(is: &ImageStream, keep_object: bool) -> Result<Self, String> {
        Self::parse(
            &serde_json::to_string(is).map_err(|e| e.to_string())?,
            keep_object,
        )
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// `namespace/name` of one ImageStream's JSON, checked as [`StreamRecord::parse`] checks it.
pub fn key_of(raw: &str) -> Result<String, String> {
    #[derive(Deserialize)]
    struct Names<'a> {
        #[serde(borrow, default)]
        kind: Option<Cow<'a, str>>,
        #[serde(borrow)]
        metadata: MetaView<'a>,
    }
    let n: Names = serde_json::from_str(raw).map_err(|e| e.to_string())?;
    n.metadata.check(n.kind.as_deref())?;
    Ok(format!("{}/{}", n.metadata.namespace, n.metadata.name))
}

/// Every image a stream references: each tag's current image and history.
pub fn images_of(is: &ImageStream) -> (Vec<ImageRef>, Vec<BadTagEvent>) {
    match StreamRecord::from_stream(is, false) {
        Ok(r) => (r.refs, r.bad),
        Err(reason) => (
            Vec::new(),
            vec![BadTagEvent {
                what: is.key(),
                reason,
            }],
        ),
    }
}

/// True when `reference` (a `dockerImageReference`) names an image on `registry`.
pub fn is_on_registry(reference: &str, registry: &str, internal_repo: &str) -> bool {
    let host = internal_repo.split('/').next().unwrap_or_default();
    let starts = |h: &str| !h.is_empty() && reference.starts_with(&format!("{h}/"));
    starts(registry) || starts(host)
}

/// Walks a single ImageStream or a `List` of them (the output of
/// `oc get is -A -o json`), calling `item` with each ImageStream's JSON as
/// the parser reaches it. `origin` names the input in errors.
pub fn scan_list<'a>(
    json: &'a [u8],
    origin: &str,
    item: &mut dyn FnMut(usize, &'a str) -> Result<(), String>,
) -> Result<(), ImageStreamError> {
    let shape = |reason: String| ImageStreamError::Shape {
        origin: origin.to_string(),
        reason,
    };
    let rest = jsonfile::scan_array(json, "items", &mut |i, raw| {
        item(i, raw.get()).map_err(|e| format!("item {i}: {e}"))
    })
    .map_err(|e| shape(e.to_string()))?;
    let kind = match rest.get("kind") {
        Some(raw) => {
            serde_json::from_str::<String>(raw.get()).map_err(|e| shape(format!("kind: {e}")))?
        }
        None => String::new(),
    };
    match kind.as_str() {
        "List" | "ImageStreamList" => Ok(()),
        // A single object has no items: its members are all in `rest`.
        "ImageStream" => {
            let text = std::str::from_utf8(json).map_err(|e| shape(e.to_string()))?;
            item(0, text).map_err(|e| shape(format!("item 0: {e}")))
        }
        other => Err(shape(format!("unexpected kind {other:?}"))),
    }
}

/// Parses a single ImageStream or a `List` of them.
pub fn parse_list(json: &[u8], origin: &str) -> Result<Vec<ImageStream>, ImageStreamError> {
    let mut out = Vec::new();
    each_stream(json, origin, &mut |is| out.push(is))?;
    Ok(out)
}

/// Checks a list as [`parse_list`] does, one ImageStream at a time (none
/// is kept); returns how many it holds.
pub fn check_list(json: &[u8], origin: &str) -> Result<usize, ImageStreamError> {
    let mut n = 0;
    each_stream(json, origin, &mut |_| n += 1)?;
    Ok(n)
}

fn each_stream(
    json: &[u8],
    origin: &str,
    f: &mut dyn FnMut(ImageStream),
) -> Result<(), ImageStreamError> {
    scan_list(json, origin, &mut |_, raw| {
        let is: ImageStream = serde_json::from_str(raw).map_err(|e| e.to_string())?;
        check_identity(&is.kind, &is.metadata.namespace, &is.metadata.name)?;
        f(is);
        Ok(())
    })
}

/// Opens an ImageStream file for [`scan_list`].
pub fn open(path: &Path) -> Result<JsonFile, ImageStreamError> {
    JsonFile::open(path).map_err(|source| ImageStreamError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Serializes a set of streams as an `oc get is -o json` List, directly
/// (no intermediate tree).
pub fn list_json<T: Serialize>(streams: impl IntoIterator<Item = T>) -> Vec<u8> {
    let mut out = Vec::new();
    let items: Vec<T> = streams.into_iter().collect();
    write_list_json(&items, &mut out).expect("writing to memory succeeds");
    out
}

/// Writes the List that [`write_list_json`] writes for items that are
/// JSON text already, one item at a time (each may be unpacked just for its
/// turn).
pub fn write_list_raw<'a>(
    items: impl IntoIterator<Item = std::io::Result<Cow<'a, str>>>,
    mut w: impl std::io::Write,
) -> std::io::Result<()> {
    w.write_all(
        br#"{"apiVersion":"v1","kind":"List","metadata":{"resourceVersion":""},"items":["#,
    )?;
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            w.write_all(b",")?;
        }
        w.write_all(item?.as_bytes())?;
    }
    w.write_all(b"]}")
}

/// An ImageStream object as the archive stores it (JSON without
/// `managedFields`), zstd-compressed while a backup holds it: the objects
/// of 10,000 streams take about 26 MB instead of 160 MB.
#[derive(Clone)]
pub struct PackedObject {
    packed: Box<[u8]>,
    len: usize,
}

impl PackedObject {
    fn pack(json: &str) -> Result<Self, String> {
        thread_local! {
            static PACKER: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
                const { std::cell::RefCell::new(None) };
        }
        PACKER.with(|p| {
            let mut p = p.borrow_mut();
            let packer = match &mut *p {
                Some(c) => c,
                None => p.insert(zstd::bulk::Compressor::new(1).map_err(|e| e.to_string())?),
            };
            let packed = packer
                .compress(json.as_bytes())
                .map_err(|e| e.to_string())?;
            Ok(PackedObject {
                packed: packed.into_boxed_slice(),
                len: json.len(),
            })
        })
    }

    /// The object's JSON.
    pub fn json(&self) -> std::io::Result<String> {
        let bytes = zstd::bulk::decompress(&self.packed, self.len)?;
        String::from_utf8(bytes).map_err(std::io::Error::other)
    }
}

impl std::fmt::Debug for PackedObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PackedObject({} bytes in {})",
            self.len,
            self.packed.len()
        )
    }
}

/// Writes what [`list_json`] returns.
pub fn write_list_json<T: Serialize>(items: &[T], w: impl std::io::Write) -> std::io::Result<()> {
    write_list_raw(
        items.iter().map(|i| {
            serde_json::to_string(i)
                .map(Cow::Owned)
                .map_err(std::io::Error::from)
        }),
        w,
    )
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
    fn a_reference_only_tag_event_is_no_image_and_no_failure() {
        let raw = r#"{"kind":"ImageStream","metadata":{"name":"app","namespace":"ns"},
          "spec":{"tags":[{"name":"ref","reference":true,"from":{"kind":"DockerImage","name":"quay.io/x/y:1"}}]},
          "status":{"dockerImageRepository":"r/ns/app","tags":[
            {"tag":"ref","items":[{"created":"2024-01-01T00:00:00Z","dockerImageReference":"quay.io/x/y:1","generation":1}]},
            {"tag":"broken","items":[{"created":"2024-01-01T00:00:00Z","dockerImageReference":"","image":"","generation":1}]}]}}"#;
        let r = StreamRecord::parse(raw, false).unwrap();
        assert!(r.refs.is_empty());
        // An item that names nothing at all is still reported.
        assert_eq!(r.bad.len(), 1, "{:?}", r.bad);
        assert!(
            r.bad[0].what.ends_with("ns/app:broken item 0"),
            "{:?}",
            r.bad
        );
    }

    #[test]
    fn a_tag_name_no_registry_takes_is_reported_not_archived() {
        // OpenShift lets `oc tag` write such a status tag; the archive's
        // reader refuses it, so it must not reach an index entry.
        let raw = REAL.replace(r#"{"tag":"latest""#, r#"{"tag":"1.2.0+build7""#);
        let list = parse_list(raw.as_bytes(), "test").unwrap();
        let (refs, bad) = images_of(&list[0]);
        assert!(refs.is_empty(), "{refs:?}");
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert_eq!(bad[0].what, "ns/app:1.2.0+build7");
        assert!(bad[0].reason.contains("2 image(s)"), "{}", bad[0].reason);
        assert!(!crate::index::is_valid_tag("1.2.0+build7"));
    }

    #[test]
    fn a_list_of_packed_objects_is_written_as_serde_writes_it() {
        let list = parse_list(REAL.as_bytes(), "test").unwrap();
        for n in 0..=list.len() {
            let packed: Vec<PackedObject> = list[..n]
                .iter()
                .map(|is| PackedObject::pack(&serde_json::to_string(is).unwrap()).unwrap())
                .collect();
            let mut raw = Vec::new();
            write_list_raw(packed.iter().map(|p| p.json().map(Cow::Owned)), &mut raw).unwrap();
            // The List as archives hold it (serde's order of these fields).
            #[derive(Serialize)]
            struct ListOut<'a> {
                #[serde(rename = "apiVersion")]
                api_version: &'static str,
                kind: &'static str,
                metadata: Value,
                items: &'a [ImageStream],
            }
            let expected = serde_json::to_string(&ListOut {
                api_version: "v1",
                kind: "List",
                metadata: serde_json::json!({"resourceVersion": ""}),
                items: &list[..n],
            })
            .unwrap();
            assert_eq!(String::from_utf8(raw).unwrap(), expected);
            let mut via_serde = Vec::new();
            write_list_json(&list[..n], &mut via_serde).unwrap();
            assert_eq!(String::from_utf8(via_serde).unwrap(), expected);
        }
    }

    #[test]
    fn parses_a_real_list_and_keeps_unknown_fields() {
        let list = parse_list(REAL.as_bytes(), "test").unwrap();
        assert_eq!(list.len(), 2);
        let (refs, bad) = images_of(&list[0]);
        assert!(bad.is_empty());
        assert_eq!(refs.len(), 2);
        assert_eq!(refs[1].position, 1);
        assert!(is_on_registry(
            &refs[0].docker_image_reference(),
            "x:5000",
            &list[0].status.docker_image_repository
        ));
        assert!(refs[0].other_reference.is_none());
        assert_eq!(
            refs[1].docker_image_reference(),
            "quay.io/x/y@sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
        );
        assert!(!is_on_registry(
            &refs[1].docker_image_reference(),
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
        // --skip-external: the internal registry's host or the one backed
        // up from are not external; another registry is; no reference at
        // all is not.
        assert!(!refs[0].is_external("x:5000"));
        assert!(refs[1].is_external("x:5000"));
        assert!(!refs[1].is_external("quay.io"));
        let mut none = refs[1].clone();
        none.other_reference = Some("".into());
        assert!(!none.is_external("x:5000"));
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

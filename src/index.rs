//! `index.json`: what the archive holds, as an OCI image index.
//!
//! One descriptor per archived tag event. The current image of a tag
//! (position 0) carries `org.opencontainers.image.ref.name = ns/name:tag`,
//! so `skopeo inspect oci:ARCHIVE:ns/name:tag` works; history items carry
//! the same annotations without a ref name. The ImageStream objects are a
//! blob (an `oc get is -o json` List) named by an annotation of the index
//! itself, so one rename of `index.json` commits one consistent state.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::digest::Digest;
use crate::jsonfile::{self, JsonFile};

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
///
/// Names are shared (a backup's entries share them with its ImageStream
/// records, one allocation per stream and tag), and so is the repository of
/// a `dockerImageReference` that is `<repository>@<digest>`: an index of a
/// million entries is held in about 150 bytes each plus its `created`.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Namespace of the stream.
    pub namespace: Arc<str>,
    /// Name of the stream.
    pub stream: Arc<str>,
    /// Tag name.
    pub tag: Arc<str>,
    /// 0 for the current image, 1.. for history (newest first).
    pub position: usize,
    /// The manifest (or index) digest.
    pub digest: Digest,
    /// The manifest's media type.
    pub media_type: Arc<str>,
    /// The manifest's size in bytes.
    pub size: u64,
    /// The tag event's `created`.
    pub created: Box<str>,
    /// The tag event's `dockerImageReference`.
    pub reference: Reference,
}

/// A tag event's `dockerImageReference`.
#[derive(Debug, Clone)]
pub enum Reference {
    /// `<repository>@<digest>` with the entry's digest, which is what the
    /// registry records for a pushed image: only the stream's repository is
    /// held, shared by its entries.
    At(Arc<str>),
    /// Any other text (empty when the event had none).
    Text(Box<str>),
}

impl Default for Reference {
    fn default() -> Self {
        Reference::Text(Box::default())
    }
}

/// Entries are equal when they read the same: an `At` reference equals the
/// text it stands for.
impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        self.sort_key() == o.sort_key()
            && self.digest == o.digest
            && self.media_type == o.media_type
            && self.size == o.size
            && self.created == o.created
            && self.reference() == o.reference()
    }
}

impl Eq for Entry {}

impl Entry {
    /// `ns/name:tag`, the ref name of a current tag.
    pub fn ref_name(&self) -> String {
        RefName(self).to_string()
    }

    /// The tag event's `dockerImageReference`.
    pub fn reference(&self) -> Cow<'_, str> {
        match &self.reference {
            Reference::At(_) => Cow::Owned(ReferenceOut(self).to_string()),
            Reference::Text(t) => Cow::Borrowed(t),
        }
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

/// An archived tag event as read from `index.json`, borrowed from it.
#[derive(Debug, Clone, Copy)]
pub struct EntryRef<'a> {
    /// Namespace of the stream.
    pub namespace: &'a str,
    /// Name of the stream.
    pub stream: &'a str,
    /// Tag name.
    pub tag: &'a str,
    /// Position in the tag's history (0: current).
    pub position: usize,
    /// The manifest (or index) digest.
    pub digest: &'a Digest,
    /// The manifest's size in bytes, as the index says.
    pub size: u64,
}

/// Decides, for each entry read, whether it is kept and at which position.
pub type OnEntry<'f> = dyn FnMut(&EntryRef<'_>) -> Option<usize> + 'f;

/// One of our descriptors as read, borrowed from `index.json`.
#[derive(Deserialize)]
struct DescriptorIn<'a> {
    #[serde(rename = "mediaType", borrow)]
    media_type: Cow<'a, str>,
    digest: Digest,
    size: u64,
    #[serde(default, borrow)]
    annotations: AnnotationsIn<'a>,
}

/// Our annotations, read into fields (others are ignored).
#[derive(Deserialize, Default)]
struct AnnotationsIn<'a> {
    #[serde(rename = "io.imagestream-archiver.namespace", borrow)]
    namespace: Option<Cow<'a, str>>,
    #[serde(rename = "io.imagestream-archiver.imagestream", borrow, default)]
    stream: Cow<'a, str>,
    #[serde(rename = "io.imagestream-archiver.tag", borrow, default)]
    tag: Cow<'a, str>,
    #[serde(rename = "io.imagestream-archiver.history-index", borrow, default)]
    position: Cow<'a, str>,
    #[serde(rename = "io.imagestream-archiver.created", borrow, default)]
    created: Cow<'a, str>,
    #[serde(
        rename = "io.imagestream-archiver.docker-image-reference",
        borrow,
        default
    )]
    reference: Cow<'a, str>,
}

impl DescriptorIn<'_> {
    /// Reads element `i` of `manifests`: `None` for a descriptor that is
    /// not ours, an error for one of ours that is not valid.
    fn read<'t>(
        i: usize,
        text: &'t str,
        ours: &memchr::memmem::Finder,
    ) -> Result<Option<DescriptorIn<'t>>, String> {
        if ours.find(text.as_bytes()).is_none() {
            return Ok(None);
        }
        let d: DescriptorIn =
            serde_json::from_str(text).map_err(|e| format!("manifests[{i}]: {e}"))?;
        let Some(namespace) = &d.annotations.namespace else {
            return Ok(None);
        };
        let a = &d.annotations;
        if a.stream.is_empty() || a.tag.is_empty() {
            return Err(format!("manifests[{i}]: stream or tag annotation missing"));
        }
        a.position
            .parse::<usize>()
            .map_err(|_| format!("manifests[{i}]: bad {ANN_POSITION}"))?;
        validate_names(namespace, &a.stream, &a.tag).map_err(|e| format!("manifests[{i}]: {e}"))?;
        Ok(Some(d))
    }

    /// The entry, borrowed (names checked by [`DescriptorIn::read`]).
    fn entry_ref(&self) -> EntryRef<'_> {
        let a = &self.annotations;
        EntryRef {
            namespace: a.namespace.as_deref().unwrap_or_default(),
            stream: &a.stream,
            tag: &a.tag,
            position: a.position.parse().unwrap_or_default(),
            digest: &self.digest,
            size: self.size,
        }
    }

    /// The entry, owned. Names and media type equal to those of `prev`
    /// (the entry read before it: in a sorted index, mostly the same
    /// stream and tag) are shared with it instead of allocated again.
    fn into_entry(self, prev: Option<&Entry>) -> Entry {
        fn share(s: Cow<'_, str>, prev: Option<&Arc<str>>) -> Arc<str> {
            match prev {
                Some(p) if **p == *s => p.clone(),
                _ => s.into(),
            }
        }
        let a = self.annotations;
        Entry {
            namespace: share(a.namespace.unwrap_or_default(), prev.map(|p| &p.namespace)),
            stream: share(a.stream, prev.map(|p| &p.stream)),
            tag: share(a.tag, prev.map(|p| &p.tag)),
            position: a.position.parse().unwrap_or_default(),
            created: a.created.into(),
            reference: Reference::Text(a.reference.into()),
            digest: self.digest,
            media_type: share(self.media_type, prev.map(|p| &p.media_type)),
            size: self.size,
        }
    }
}

/// Our descriptor as written: fields in sorted order, as a JSON object
/// with sorted keys would have them.
#[derive(Serialize)]
struct DescriptorOut<'a> {
    annotations: AnnotationsOut<'a>,
    digest: &'a Digest,
    #[serde(rename = "mediaType")]
    media_type: &'a str,
    size: u64,
}

#[derive(Serialize)]
struct AnnotationsOut<'a> {
    #[serde(
        rename = "io.imagestream-archiver.created",
        skip_serializing_if = "str::is_empty"
    )]
    created: &'a str,
    #[serde(
        rename = "io.imagestream-archiver.docker-image-reference",
        skip_serializing_if = "ReferenceOut::is_empty"
    )]
    reference: Text<ReferenceOut<'a>>,
    #[serde(rename = "io.imagestream-archiver.history-index")]
    position: Text<usize>,
    #[serde(rename = "io.imagestream-archiver.imagestream")]
    stream: &'a str,
    #[serde(rename = "io.imagestream-archiver.namespace")]
    namespace: &'a str,
    #[serde(rename = "io.imagestream-archiver.tag")]
    tag: &'a str,
    #[serde(
        rename = "org.opencontainers.image.ref.name",
        skip_serializing_if = "Option::is_none"
    )]
    ref_name: Option<Text<RefName<'a>>>,
}

/// A value written as the JSON string of its `Display` form, without an
/// allocation.
struct Text<T>(T);

impl<T: std::fmt::Display> Serialize for Text<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// The `dockerImageReference` of an entry, rendered where it is shown
/// or written.
struct ReferenceOut<'a>(&'a Entry);

impl ReferenceOut<'_> {
    fn is_empty(r: &Text<Self>) -> bool {
        matches!(&r.0 .0.reference, Reference::Text(t) if t.is_empty())
    }
}

impl std::fmt::Display for ReferenceOut<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0.reference {
            Reference::At(repository) => write!(f, "{repository}@{}", self.0.digest),
            Reference::Text(t) => f.write_str(t),
        }
    }
}

/// `ns/name:tag` of an entry.
struct RefName<'a>(&'a Entry);

impl std::fmt::Display for RefName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let e = self.0;
        write!(f, "{}/{}:{}", e.namespace, e.stream, e.tag)
    }
}

/// The `manifests` array, built descriptor by descriptor as it is written:
/// an index of a million entries is never a second time in memory.
struct ManifestsOut<'a>(&'a ArchiveIndex);

impl Serialize for ManifestsOut<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let index = self.0;
        let ours = index.entries.iter().map(|e| {
            ManifestOut::Ours(DescriptorOut {
                annotations: AnnotationsOut {
                    created: &e.created,
                    reference: Text(ReferenceOut(e)),
                    position: Text(e.position),
                    stream: &e.stream,
                    namespace: &e.namespace,
                    tag: &e.tag,
                    ref_name: (e.position == 0).then_some(Text(RefName(e))),
                },
                digest: &e.digest,
                media_type: &e.media_type,
                size: e.size,
            })
        });
        s.collect_seq(ours.chain(index.foreign.iter().map(ManifestOut::Foreign)))
    }
}

#[derive(Serialize)]
#[serde(untagged)]
enum ManifestOut<'a> {
    Ours(DescriptorOut<'a>),
    Foreign(&'a Value),
}

#[derive(Serialize)]
struct RawIndexOut<'a> {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    #[serde(rename = "mediaType")]
    media_type: &'static str,
    manifests: ManifestsOut<'a>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<&'static str, String>,
}

type Members<'a> = BTreeMap<String, &'a serde_json::value::RawValue>;

fn check_schema(rest: &Members) -> Result<(), String> {
    let version = match rest.get("schemaVersion") {
        Some(v) => {
            serde_json::from_str::<u32>(v.get()).map_err(|e| format!("schemaVersion: {e}"))?
        }
        None => return Err("missing field `schemaVersion`".into()),
    };
    if version != 2 {
        return Err(format!("schemaVersion {version} is not 2"));
    }
    Ok(())
}

fn imagestreams_of(rest: &Members) -> Result<Option<Digest>, String> {
    let Some(raw) = rest.get("annotations") else {
        return Ok(None);
    };
    let annotations: BTreeMap<String, String> =
        serde_json::from_str(raw.get()).map_err(|e| format!("annotations: {e}"))?;
    annotations
        .get(ANN_IMAGESTREAMS)
        .map(|s| Digest::parse(s).map_err(|e| e.to_string()))
        .transpose()
}

/// What a plan needs of the committed index: the digest, media type and
/// size of each archived tag event's image, held compactly (half a million
/// entries fit in a few tens of megabytes).
#[derive(Debug, Default)]
pub struct Known {
    media_types: Vec<String>,
    map: HashMap<Digest, (u32, u16)>,
}

impl Known {
    /// True when `digest` is an archived image.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.map.contains_key(digest)
    }

    /// Media type and size of an archived image.
    pub fn get(&self, digest: &Digest) -> Option<(&str, u64)> {
        self.map
            .get(digest)
            .map(|&(size, t)| (self.media_types[usize::from(t)].as_str(), u64::from(size)))
    }

    /// Records an archived image. (A manifest is at most a few megabytes;
    /// one too large for the compact form is simply not recorded, and is
    /// then found in the blob store.)
    pub fn insert(&mut self, digest: Digest, media_type: &str, size: u64) {
        let Ok(size) = u32::try_from(size) else {
            return;
        };
        let t = match self.media_types.iter().position(|m| m == media_type) {
            Some(t) => t,
            None => {
                self.media_types.push(media_type.to_string());
                self.media_types.len() - 1
            }
        };
        if let Ok(t) = u16::try_from(t) {
            self.map.insert(digest, (size, t));
        }
    }

    /// Number of archived images recorded.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Reads the images of a mapped `index.json` (our entries; descriptors
    /// of other tools are not images of ours), releasing what was parsed.
    pub fn from_file(file: &JsonFile) -> Result<Self, String> {
        let mut known = Known::default();
        let ours = memchr::memmem::Finder::new(ANN_NAMESPACE);
        let rest = jsonfile::scan_array(file.bytes(), "manifests", &mut |i, value| {
            let text = value.get();
            // Checked as the full reader checks it: a bad index stops the
            // run before anything is fetched.
            if let Some(d) = DescriptorIn::read(i, text, &ours)? {
                known.insert(d.digest, &d.media_type, d.size);
            }
            file.release_through(text);
            Ok(())
        })
        .map_err(|e| e.to_string())?;
        check_schema(&rest)?;
        imagestreams_of(&rest)?;
        Ok(known)
    }
}

impl ArchiveIndex {
    /// Parses `index.json` bytes.
    pub fn from_json(data: &[u8]) -> Result<Self, String> {
        Self::read(data, &mut |_| {}, &mut |e| Some(e.position))
    }

    /// Parses a mapped `index.json`, releasing what was parsed.
    pub fn from_file(file: &JsonFile) -> Result<Self, String> {
        Self::from_file_filtered(file, &mut |e| Some(e.position))
    }

    /// Like [`ArchiveIndex::from_file`], but only the entries for which
    /// `keep` returns a position are kept (with that position). `keep`
    /// sees every entry in the file's order (a committed index is sorted),
    /// after it was checked; dropped entries are never copied out of the
    /// file.
    pub fn from_file_filtered(file: &JsonFile, keep: &mut OnEntry<'_>) -> Result<Self, String> {
        Self::read(file.bytes(), &mut |raw| file.release_through(raw), keep)
    }

    fn read(
        data: &[u8],
        parsed: &mut dyn FnMut(&str),
        keep: &mut OnEntry<'_>,
    ) -> Result<Self, String> {
        let mut index = ArchiveIndex::default();
        let ours = memchr::memmem::Finder::new(ANN_NAMESPACE);
        let rest = jsonfile::scan_array(data, "manifests", &mut |i, value| {
            let text = value.get();
            match DescriptorIn::read(i, text, &ours)? {
                Some(d) => {
                    if let Some(position) = keep(&d.entry_ref()) {
                        let mut entry = d.into_entry(index.entries.last());
                        entry.position = position;
                        index.entries.push(entry);
                    }
                }
                None => index
                    .foreign
                    .push(serde_json::from_str(text).map_err(|e| format!("manifests[{i}]: {e}"))?),
            }
            parsed(text);
            Ok(())
        })
        .map_err(|e| e.to_string())?;
        check_schema(&rest)?;
        index.imagestreams = imagestreams_of(&rest)?;
        index.sort();
        Ok(index)
    }

    /// Sorts entries into their canonical order.
    pub fn sort(&mut self) {
        // A committed index is already in order.
        if !self
            .entries
            .is_sorted_by(|a, b| a.sort_key() <= b.sort_key())
        {
            // A stable sort of the entries themselves would allocate room
            // for half of them; their order is found on 4-byte indices
            // (stable: of equal keys the first stays first) and applied
            // in place.
            let entries = &mut self.entries;
            let mut order: Vec<u32> =
                (0..u32::try_from(entries.len()).expect("index size")).collect();
            order.sort_by(|&a, &b| {
                entries[a as usize]
                    .sort_key()
                    .cmp(&entries[b as usize].sort_key())
            });
            permute(entries, &mut order);
        }
        self.entries.dedup_by(|a, b| a.sort_key() == b.sort_key());
    }

    /// Serializes to `index.json` bytes, deterministically.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_json(&mut out)
            .expect("writing to memory succeeds");
        out
    }

    /// Writes what [`ArchiveIndex::to_json`] returns, without holding it
    /// in memory.
    pub fn write_json(&self, w: impl std::io::Write) -> std::io::Result<()> {
        let mut annotations = BTreeMap::new();
        if let Some(d) = &self.imagestreams {
            annotations.insert(ANN_IMAGESTREAMS, d.to_string());
        }
        let raw = RawIndexOut {
            schema_version: 2,
            media_type: crate::manifest::OCI_INDEX,
            manifests: ManifestsOut(self),
            annotations,
        };
        let mut w = w;
        serde_json::to_writer(&mut w, &raw)?;
        w.write_all(b"\n")
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
                .entry(e.tag.to_string())
                .or_default()
                .push(e);
        }
        out
    }
}

/// Reorders `items` so that the item at `i` is the one that was at
/// `order[i]`, following each cycle of the permutation with swaps (`order`
/// is used up).
fn permute<T>(items: &mut [T], order: &mut [u32]) {
    const DONE: u32 = u32::MAX;
    for start in 0..order.len() {
        let mut at = start;
        while order[at] != DONE {
            let from = order[at] as usize;
            order[at] = DONE;
            if from == start {
                break;
            }
            items.swap(at, from);
            at = from;
        }
    }
}

/// True for a DNS-1123 label: lowercase alphanumerics and '-', starting
/// and ending with an alphanumeric, at most 63 characters.
fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| alnum(c) || *c == b'-')
        && alnum(&b[0])
        && alnum(&b[b.len() - 1])
}

/// True for a valid namespace: a DNS-1123 label (no '.').
pub fn is_valid_namespace(s: &str) -> bool {
    is_dns_label(s)
}

/// True for a valid ImageStream name, as OpenShift validates it: runs of
/// lowercase alphanumerics joined by single '.', '_' or '-'
/// (`[a-z0-9]+(?:[._-][a-z0-9]+)*`), at most 253 characters. `my_app` is
/// one; a repository path component of the registry, and a `ref.name`
/// component, either way.
pub fn is_valid_stream_name(s: &str) -> bool {
    s.len() <= 253
        && s.split(['.', '_', '-']).all(|run| {
            !run.is_empty()
                && run
                    .bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        })
}

/// True for a tag of the OCI grammar `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
pub fn is_valid_tag(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// Checks the names of an entry read from a possibly untrusted index: they
/// end up in registry URLs and ref names.
fn validate_names(namespace: &str, stream: &str, tag: &str) -> Result<(), String> {
    if !is_valid_namespace(namespace) {
        return Err(format!(
            "invalid namespace {namespace:?} in {ANN_NAMESPACE}"
        ));
    }
    if !is_valid_stream_name(stream) {
        return Err(format!(
            "invalid ImageStream name {stream:?} in {ANN_STREAM}"
        ));
    }
    if !is_valid_tag(tag) {
        return Err(format!("invalid tag {tag:?} in {ANN_TAG}"));
    }
    Ok(())
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
            reference: Reference::At("reg/ns/app".into()),
        }
    }

    #[test]
    fn entries_read_share_the_names_of_the_entry_before() {
        let mut idx = ArchiveIndex::default();
        idx.entries.extend([
            entry("a", 0, b"1"),
            entry("a", 1, b"2"),
            entry("b", 0, b"3"),
        ]);
        let back = ArchiveIndex::from_json(&idx.to_json()).unwrap();
        assert_eq!(back.entries, idx.entries);
        let [x, y, z] = &back.entries[..] else {
            panic!("three entries")
        };
        assert!(Arc::ptr_eq(&x.namespace, &y.namespace) && Arc::ptr_eq(&y.namespace, &z.namespace));
        assert!(Arc::ptr_eq(&x.tag, &y.tag) && !Arc::ptr_eq(&y.tag, &z.tag));
        assert!(Arc::ptr_eq(&x.media_type, &z.media_type));
    }

    #[test]
    fn permute_applies_an_order_in_place() {
        let mut items = vec!['a', 'b', 'c', 'd', 'e', 'f'];
        // Two cycles (0 2 4) and (1 5), one fixed point.
        let mut order = vec![2, 5, 4, 3, 0, 1];
        permute(&mut items, &mut order);
        assert_eq!(items, vec!['c', 'f', 'e', 'd', 'a', 'b']);
        let mut none: Vec<char> = Vec::new();
        permute(&mut none, &mut []);
    }

    #[test]
    fn sort_keeps_the_first_of_equal_entries() {
        let mut idx = ArchiveIndex::default();
        for (tag, position, data) in [
            ("b", 1, b"x1".as_slice()),
            ("a", 0, b"first"),
            ("b", 0, b"x0"),
            ("a", 0, b"second"),
        ] {
            idx.entries.push(entry(tag, position, data));
        }
        idx.sort();
        let got: Vec<(&str, usize, Digest)> = idx
            .entries
            .iter()
            .map(|e| (&*e.tag, e.position, e.digest.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a", 0, Digest::of(b"first")),
                ("b", 0, Digest::of(b"x0")),
                ("b", 1, Digest::of(b"x1")),
            ]
        );
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
    fn known_images_are_read_compactly_from_a_file() {
        let mut idx = ArchiveIndex {
            entries: vec![entry("v1", 0, b"a"), entry("v1", 1, b"b")],
            imagestreams: Some(Digest::of(b"list")),
            foreign: vec![
                serde_json::json!({"mediaType":"x/y","digest":Digest::of(b"z"),"size":1}),
            ],
        };
        idx.entries[1].media_type = crate::manifest::OCI_INDEX.into();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.json");
        std::fs::write(&path, idx.to_json()).unwrap();
        let file = JsonFile::open(&path).unwrap();
        let known = Known::from_file(&file).unwrap();
        assert_eq!(known.len(), 2, "our entries, not foreign descriptors");
        assert_eq!(
            known.get(&Digest::of(b"b")),
            Some((crate::manifest::OCI_INDEX, 1))
        );
        assert!(known.contains(&Digest::of(b"a")));
        assert!(!known.contains(&Digest::of(b"z")));
        // The full reader of the same file agrees.
        assert_eq!(ArchiveIndex::from_file(&file).unwrap(), {
            idx.sort();
            idx
        });
        // Filtered: `keep` sees every entry in order and decides; foreign
        // descriptors and the list annotation stay.
        let mut seen = Vec::new();
        let kept = ArchiveIndex::from_file_filtered(&file, &mut |e| {
            seen.push((e.tag.to_string(), e.position, e.digest.clone()));
            (e.position == 1).then_some(7)
        })
        .unwrap();
        assert_eq!(
            seen,
            [
                ("v1".to_string(), 0, Digest::of(b"a")),
                ("v1".to_string(), 1, Digest::of(b"b"))
            ]
        );
        assert_eq!(kept.entries.len(), 1);
        assert_eq!(
            (kept.entries[0].position, &kept.entries[0].digest),
            (7, &Digest::of(b"b"))
        );
        assert_eq!(
            (kept.foreign.len(), kept.imagestreams),
            (1, Some(Digest::of(b"list")))
        );
        // Too large for the compact form: left to the blob store.
        let mut k = Known::default();
        k.insert(Digest::of(b"huge"), "x", u64::from(u32::MAX) + 1);
        assert!(k.is_empty());
        drop(file);
        // Refused as the full reader refuses it, before anything is fetched.
        let bad_name = String::from_utf8(index_with("ns", "app", "bad tag!")).unwrap();
        for bad in [
            r#"{"manifests":[]}"#,
            r#"{"schemaVersion":1,"manifests":[]}"#,
            bad_name.as_str(),
        ] {
            std::fs::write(&path, bad).unwrap();
            let file = JsonFile::open(&path).unwrap();
            assert!(Known::from_file(&file).is_err(), "{bad}");
            assert!(ArchiveIndex::from_file(&file).is_err(), "{bad}");
        }
    }

    fn index_with(ns: &str, stream: &str, tag: &str) -> Vec<u8> {
        let ok = entry("v1", 0, b"a");
        let mut bad = ok.clone();
        bad.namespace = ns.into();
        bad.stream = stream.into();
        bad.tag = tag.into();
        let idx = ArchiveIndex {
            entries: vec![ok, bad],
            ..Default::default()
        };
        // Serialized as is (to_json does not validate), bad entry second.
        idx.to_json()
    }

    #[test]
    fn validates_names() {
        let long_tag = format!("v{}", "1".repeat(127));
        let long_stream = format!(
            "{}.{}.{}.{}",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61)
        );
        assert_eq!(long_stream.len(), 253);
        for (ns, stream, tag) in [
            ("ns", "app", "latest"),
            ("team-a", "my-app.v2", "_v1.0-rc_1"),
            ("team-a", "my_app", "v1"),
            ("team-a", "a.b_c-d", "v1"),
            ("a", "b", "V"),
            ("n0", long_stream.as_str(), long_tag.as_str()),
        ] {
            let json = index_with(ns, stream, tag);
            let idx = ArchiveIndex::from_json(&json)
                .unwrap_or_else(|e| panic!("{ns}/{stream}:{tag}: {e}"));
            assert_eq!(idx.entries.len(), 2);
        }
        let too_long_tag = format!("v{}", "1".repeat(128));
        let too_long_stream = format!("{long_stream}a");
        let too_long_ns = "n".repeat(64);
        let cases: Vec<(&str, &str, &str, &str)> = vec![
            ("..", "app", "v1", "\"..\""),
            ("ns", "..", "v1", "\"..\""),
            ("ns", "app", "..", "\"..\""),
            ("ns", "a/b", "v1", "\"a/b\""),
            ("a/b", "app", "v1", "\"a/b\""),
            ("ns", "app", "v/1", "\"v/1\""),
            ("ns", "app?x=1", "v1", "app?x=1"),
            ("ns", "app", "v1?", "v1?"),
            ("ns", "app", "-v1", "-v1"),
            ("ns", "app", ".v1", ".v1"),
            ("ns", "app", too_long_tag.as_str(), "invalid tag"),
            ("NS", "app", "v1", "\"NS\""),
            ("Team-a", "app", "v1", "Team-a"),
            ("n.s", "app", "v1", "\"n.s\""),
            ("-ns", "app", "v1", "-ns"),
            ("ns-", "app", "v1", "ns-"),
            (too_long_ns.as_str(), "app", "v1", "invalid namespace"),
            ("ns", "App", "v1", "\"App\""),
            ("ns", ".app", "v1", ".app"),
            ("ns", "app.", "v1", "app."),
            ("ns", "a..b", "v1", "a..b"),
            ("ns", "a__b", "v1", "a__b"),
            ("ns", "a--b", "v1", "a--b"),
            ("ns", "a_", "v1", "a_"),
            ("ns", "_a", "v1", "_a"),
            ("ns", "-app", "v1", "-app"),
            ("ns", "app:1", "v1", "app:1"),
            (
                "ns",
                too_long_stream.as_str(),
                "v1",
                "invalid ImageStream name",
            ),
            ("ns", "app", "v 1", "v 1"),
            ("ns", "app", "v1@x", "v1@x"),
        ];
        for (ns, stream, tag, shown) in cases {
            let err = ArchiveIndex::from_json(&index_with(ns, stream, tag))
                .expect_err(&format!("{ns}/{stream}:{tag} accepted"));
            assert!(err.starts_with("manifests[1]: invalid"), "{err}");
            assert!(err.contains(shown), "{ns}/{stream}:{tag}: {err}");
        }
        // Empty names (present but empty annotations) are refused too.
        for (ns, stream, tag) in [("", "app", "v1"), ("ns", "", "v1"), ("ns", "app", "")] {
            let err = ArchiveIndex::from_json(&index_with(ns, stream, tag)).unwrap_err();
            assert!(
                err.starts_with("manifests[1]:"),
                "{ns}/{stream}:{tag}: {err}"
            );
        }
    }

    #[test]
    fn rejects_bad_digest_in_index() {
        let bad = br#"{"schemaVersion":2,"manifests":[{"mediaType":"a","digest":"sha256:../../etc","size":1,"annotations":{"io.imagestream-archiver.namespace":"n"}}]}"#;
        assert!(ArchiveIndex::from_json(bad).is_err());
    }
}

//! Large JSON inputs: `index.json` and `oc get is -A -o json` files.
//!
//! On a cluster of 10,000 ImageStreams both are hundreds of megabytes.
//! Reading such a file copies every byte into fresh memory; mapping it costs
//! no copy, and releasing the pages the parser has gone past keeps resident
//! memory to a window instead of the whole file. [`scan_array`] hands the
//! elements of the file's big array to a callback one at a time, borrowed
//! from the file, so no tree of the document is ever built.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// Pages behind the parser are released in steps of this size.
const RELEASE_STEP: usize = 16 << 20;

/// How far ahead of the parser the file is asked for: a cold read from
/// disk then runs in parallel with the parsing, not one readahead window
/// at a time.
const READ_AHEAD: usize = 256 << 20;

fn read_ahead(map: &memmap2::Mmap, from: usize, len: usize) {
    if from < map.len() {
        let len = len.min(map.len() - from);
        let _ = map.advise_range(memmap2::Advice::WillNeed, from, len);
    }
}

/// A JSON file's bytes: mapped when it is a regular file, read otherwise
/// (a pipe such as `/dev/stdin`).
pub struct JsonFile {
    data: Data,
    released: std::cell::Cell<usize>,
}

enum Data {
    Mapped(memmap2::Mmap),
    Read(Vec<u8>),
}

impl JsonFile {
    /// Opens `path`.
    pub fn open(path: &Path) -> io::Result<Self> {
        let mut file = File::open(path)?;
        let meta = file.metadata()?;
        // SAFETY: the mapping is read-only and nothing here writes to it.
        // The archive never rewrites a file in place (index.json and blobs
        // are replaced by rename, under the archive's lock); an input file
        // that another process truncates while it is read ends the process
        // with SIGBUS, as with any tool that maps its input.
        let mapped = (meta.is_file() && meta.len() > 0)
            .then(|| unsafe { memmap2::Mmap::map(&file) }.ok())
            .flatten();
        let data = match mapped {
            Some(map) => {
                // Only hints: reading works without them.
                let _ = map.advise(memmap2::Advice::Sequential);
                read_ahead(&map, 0, READ_AHEAD);
                Data::Mapped(map)
            }
            // Not mappable (a pipe, an empty file, a file system without
            // mmap): read.
            None => {
                let mut buf = Vec::new();
                file.read_to_end(&mut buf)?;
                Data::Read(buf)
            }
        };
        Ok(JsonFile {
            data,
            released: std::cell::Cell::new(0),
        })
    }

    /// The file's bytes.
    pub fn bytes(&self) -> &[u8] {
        match &self.data {
            Data::Mapped(m) => m,
            Data::Read(v) => v,
        }
    }

    /// Tells the kernel that the bytes before the end of `consumed` (a
    /// slice of [`Self::bytes`]) are not needed any more: their pages leave
    /// the resident set. Reading them again stays correct (they are read
    /// back from the file); it is only slower.
    pub fn release_through(&self, consumed: &str) {
        let base = self.bytes().as_ptr() as usize;
        let end = consumed.as_ptr() as usize + consumed.len();
        if end >= base && end <= base + self.bytes().len() {
            self.release_before(end - base);
        }
    }

    /// Like [`JsonFile::release_through`], for the bytes before `offset`.
    pub fn release_before(&self, offset: usize) {
        let Data::Mapped(map) = &self.data else {
            return;
        };
        let upto = offset.min(map.len()) / RELEASE_STEP * RELEASE_STEP;
        let from = self.released.get();
        if upto <= from {
            return;
        }
        // SAFETY: a read-only file mapping that this process never writes:
        // after MADV_DONTNEED its pages are read back from the (unchanged,
        // see `open`) file on the next access, so borrows stay valid.
        let _ = unsafe {
            map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, from, upto - from)
        };
        self.released.set(upto);
        // The window ahead moves as far as the released part did.
        read_ahead(map, from + READ_AHEAD, upto - from);
    }
}

/// A callback for each element of the scanned array: its position and raw
/// text. An error ends the scan with that message.
pub type OnElement<'f, 'a> = dyn FnMut(usize, &'a RawValue) -> Result<(), String> + 'f;

/// Parses `json`, a JSON object, calling `element` for each element of its
/// array member `key` as the parser reaches it, and returns the object's
/// other members, raw. A `key` member that is `null` has no elements.
pub fn scan_array<'a>(
    json: &'a [u8],
    key: &str,
    element: &mut OnElement<'_, 'a>,
) -> Result<BTreeMap<String, &'a RawValue>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(json);
    let rest = Object { key, element }.deserialize(&mut de)?;
    de.end()?;
    Ok(rest)
}

struct Object<'k, 'f, 'g, 'a> {
    key: &'k str,
    element: &'f mut OnElement<'g, 'a>,
}

impl<'a> DeserializeSeed<'a> for Object<'_, '_, '_, 'a> {
    type Value = BTreeMap<String, &'a RawValue>;
    fn deserialize<D: Deserializer<'a>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'a> Visitor<'a> for Object<'_, '_, '_, 'a> {
    type Value = BTreeMap<String, &'a RawValue>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<M: MapAccess<'a>>(self, mut map: M) -> Result<Self::Value, M::Error> {
        let mut rest = BTreeMap::new();
        let mut seen = false;
        while let Some(k) = map.next_key::<String>()? {
            if k == self.key {
                if seen {
                    return Err(de::Error::custom(format!("duplicate field `{k}`")));
                }
                seen = true;
                map.next_value_seed(Elements {
                    element: &mut *self.element,
                })?;
            } else {
                let v: &'a RawValue = map.next_value()?;
                if rest.contains_key(&k) {
                    return Err(de::Error::custom(format!("duplicate field `{k}`")));
                }
                rest.insert(k, v);
            }
        }
        Ok(rest)
    }
}

struct Elements<'f, 'g, 'a> {
    element: &'f mut OnElement<'g, 'a>,
}

impl<'a> DeserializeSeed<'a> for Elements<'_, '_, 'a> {
    type Value = ();
    fn deserialize<D: Deserializer<'a>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'a> Visitor<'a> for Elements<'_, '_, 'a> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array")
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<S: SeqAccess<'a>>(self, mut seq: S) -> Result<(), S::Error> {
        let mut i = 0;
        while let Some(raw) = seq.next_element::<&'a RawValue>()? {
            (self.element)(i, raw).map_err(de::Error::custom)?;
            i += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(json: &str) -> Result<(Vec<String>, Vec<String>), String> {
        let mut seen = Vec::new();
        let rest = scan_array(json.as_bytes(), "items", &mut |i, raw| {
            if raw.get() == "\"stop\"" {
                return Err(format!("item {i} said stop"));
            }
            seen.push(raw.get().to_string());
            Ok(())
        })
        .map_err(|e| e.to_string())?;
        Ok((seen, rest.keys().cloned().collect()))
    }

    #[test]
    fn elements_arrive_in_order_and_the_rest_is_returned() {
        let (items, rest) =
            scan(r#"{"kind":"List","items":[{"a":1}, 2 ,"x"],"metadata":{}}"#).unwrap();
        assert_eq!(items, [r#"{"a":1}"#, "2", r#""x""#]);
        assert_eq!(rest, ["kind", "metadata"]);
        assert_eq!(scan(r#"{"items":null}"#).unwrap().0.len(), 0);
        assert_eq!(scan(r#"{"kind":"ImageStream"}"#).unwrap().1, ["kind"]);
    }

    #[test]
    fn bad_input_and_callback_errors_end_the_scan() {
        for bad in [
            "",
            "[]",
            "not json",
            r#"{"items":{}}"#,
            r#"{"items":[1,2"#,
            r#"{"items":[1],"items":[2]}"#,
            r#"{"kind":"a","items":[],"kind":"b"}"#,
            r#"{"items":[]} trailing"#,
        ] {
            assert!(scan(bad).is_err(), "{bad}");
        }
        let e = scan(r#"{"items":[1,"stop",3]}"#).unwrap_err();
        assert!(e.contains("item 1 said stop"), "{e}");
    }

    #[test]
    fn a_mapped_file_releases_what_was_parsed_and_stays_readable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.json");
        let item = format!("{{\"pad\":\"{}\"}}", "x".repeat(1000));
        let n = 3 * RELEASE_STEP / item.len();
        let json = format!("{{\"items\":[{}]}}", vec![item.as_str(); n].join(","));
        std::fs::write(&path, &json).unwrap();
        let file = JsonFile::open(&path).unwrap();
        let mut count = 0;
        scan_array(file.bytes(), "items", &mut |_, raw| {
            count += 1;
            file.release_through(raw.get());
            Ok(())
        })
        .unwrap();
        assert_eq!(count, n);
        assert!(file.released.get() >= 2 * RELEASE_STEP);
        // Released pages read back with their content.
        assert_eq!(file.bytes(), json.as_bytes());
        drop(file);
        // A file that cannot be mapped (empty) is read.
        std::fs::write(&path, "").unwrap();
        assert!(JsonFile::open(&path).unwrap().bytes().is_empty());
    }
}

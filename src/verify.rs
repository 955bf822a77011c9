//! `verify`: re-hash every blob, check every index entry's closure, and the
//! layout's own files.

use std::collections::HashSet;

use rayon::prelude::*;
use serde::Serialize;

use crate::closure;
use crate::digest::Digest;
use crate::imagestream;
use crate::layout::{Layout, LayoutError, INGEST_DIR};

/// One problem found.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Problem {
    /// `corrupt-blob`, `missing-blob`, `bad-manifest`, `bad-entry`, `layout`, ...
    pub kind: &'static str,
    /// The blob concerned, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<Digest>,
    /// What is wrong, naming the image or file.
    pub message: String,
}

/// The result of `verify`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    /// Blobs re-hashed.
    pub blobs_checked: usize,
    /// Bytes re-hashed.
    pub bytes_checked: u64,
    /// Index entries checked.
    pub entries_checked: usize,
    /// Problems; empty means the archive is sound.
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    /// True when nothing is wrong.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// What [`corrupt_blobs`] found: the bad blobs with a reason, how many blobs
/// and bytes were re-hashed.
pub type RehashResult = (Vec<(Digest, String)>, usize, u64);

/// Re-hashes every blob (on all cores) and returns the digests whose
/// content does not match their name, with the reason.
pub fn corrupt_blobs(layout: &Layout) -> Result<RehashResult, LayoutError> {
    let blobs = layout.list_blobs()?;
    let bytes = blobs.iter().map(|(_, m)| m.len()).sum();
    let bad = blobs
        .par_iter()
        .filter_map(|(d, _)| match layout.check_blob(d) {
            Ok(()) => None,
            Err(LayoutError::Damaged { reason, .. }) => Some((d.clone(), reason)),
            Err(e) => Some((d.clone(), format!("unreadable: {e}"))),
        })
        .collect();
    Ok((bad, blobs.len(), bytes))
}

/// Checks one archived tag event: its size, and that its whole closure is
/// there with the sizes its manifests give.
fn check_entry(
    layout: &Layout,
    e: &crate::index::EntryRef<'_>,
    corrupt_set: &HashSet<Digest>,
    reported_missing: &mut HashSet<(Digest, Digest)>,
    problems: &mut Vec<Problem>,
) {
    let what = format!(
        "{}/{}:{} (history {})",
        e.namespace, e.stream, e.tag, e.position
    );
    match layout.blob_size(e.digest) {
        Some(size) if size != e.size => problems.push(Problem {
            kind: "bad-entry",
            digest: Some(e.digest.clone()),
            message: format!("{what}: index says {} bytes, blob has {size}", e.size),
        }),
        _ => {}
    }
    if corrupt_set.contains(e.digest) {
        return;
    }
    let mut seen = HashSet::new();
    match closure::walk(layout, e.digest, &mut seen) {
        Ok(nodes) => {
            for n in nodes {
                if let Some(size) = n.size {
                    if layout.blob_size(&n.digest) != Some(size) && !corrupt_set.contains(&n.digest)
                    {
                        problems.push(Problem {
                            kind: "bad-size",
                            digest: Some(n.digest.clone()),
                            message: format!(
                                "{what}: blob {} should have {size} bytes, has {:?}",
                                n.digest,
                                layout.blob_size(&n.digest)
                            ),
                        });
                    }
                }
            }
        }
        Err(err) => {
            if reported_missing.insert((e.digest.clone(), err.blob().clone())) {
                problems.push(Problem {
                    kind: match err {
                        closure::ClosureError::Missing { .. } => "missing-blob",
                        closure::ClosureError::Unreadable { .. } => "bad-manifest",
                    },
                    digest: Some(err.blob().clone()),
                    message: format!("{what}: {err}"),
                });
            }
        }
    }
}

/// Verifies the whole archive.
pub fn verify(layout: &Layout) -> Result<VerifyReport, LayoutError> {
    let mut report = VerifyReport::default();
    let root = layout.root();
    match std::fs::read(root.join("oci-layout")) {
        Ok(b) => {
            let ok = serde_json::from_slice::<serde_json::Value>(&b)
                .ok()
                .and_then(|v| {
                    v.get("imageLayoutVersion")
                        .and_then(|s| s.as_str())
                        .map(str::to_owned)
                })
                .is_some();
            if !ok {
                report.problems.push(Problem {
                    kind: "layout",
                    digest: None,
                    message: "oci-layout has no imageLayoutVersion".into(),
                });
            }
        }
        Err(e) => report.problems.push(Problem {
            kind: "layout",
            digest: None,
            message: format!("oci-layout: {e}"),
        }),
    }
    // No index.json is an archive that has committed nothing yet: empty,
    // not broken (a first run stopped before its commit).
    let (corrupt, n, bytes) = corrupt_blobs(layout)?;
    report.blobs_checked = n;
    report.bytes_checked = bytes;
    let corrupt_set: HashSet<Digest> = corrupt.iter().map(|(d, _)| d.clone()).collect();
    for (d, reason) in corrupt {
        report.problems.push(Problem {
            kind: "corrupt-blob",
            digest: Some(d.clone()),
            message: format!("blob {d}: {reason}"),
        });
    }
    // The index is read one entry at a time, each checked as it comes.
    let mut reported_missing = HashSet::new();
    let mut entry_problems = Vec::new();
    let mut entries_checked = 0;
    let index = layout.read_index_filtered(&mut |e| {
        entries_checked += 1;
        check_entry(
            layout,
            e,
            &corrupt_set,
            &mut reported_missing,
            &mut entry_problems,
        );
        None
    });
    let index = match index {
        Ok(i) => i,
        Err(e) => {
            report.problems.push(Problem {
                kind: "index",
                digest: None,
                message: e.to_string(),
            });
            return Ok(report);
        }
    };
    report.entries_checked = entries_checked;
    report.problems.extend(entry_problems);
    if let Some(d) = &index.imagestreams {
        let path = layout.blob_path(d);
        let checked = imagestream::open(&path).and_then(|file| {
            imagestream::check_list(file.bytes(), &format!("archived ImageStream list {d}"))
        });
        match checked {
            Ok(_) => {}
            Err(imagestream::ImageStreamError::Read { source, .. }) => {
                report.problems.push(Problem {
                    kind: "missing-blob",
                    digest: Some(d.clone()),
                    message: format!("ImageStream list {d}: {source}"),
                })
            }
            Err(e) => report.problems.push(Problem {
                kind: "imagestreams",
                digest: Some(d.clone()),
                message: e.to_string(),
            }),
        }
    }
    let _ = INGEST_DIR;
    Ok(report)
}

//! imagestream-archiver: back up every image of OpenShift ImageStreams into
//! one content-addressed OCI image layout, and push it back.
//!
//! One module per noun of the data flow:
//! - [`imagestream`]: the ImageStream objects and their tag histories;
//! - [`discovery`]: finding ImageStreams through the Kubernetes API;
//! - [`digest`]: the validated digest type every blob path is built from;
//! - [`layout`]: the OCI image layout on disk (blob store, index, lock);
//! - [`registry`]: the registry client (pull, push, retries, auth, TLS);
//! - [`transfer`]: the copy machinery shared by backup and restore;
//! - [`capacity`]: free space, the plan's needs, and PVC expansion.

pub mod apply;
pub mod backup;
pub mod capacity;
pub mod cli;
pub mod closure;
pub mod cmd;
pub mod digest;
pub mod discovery;
pub mod export;
pub mod gc;
pub mod imagestream;
pub mod import;
pub mod index;
pub mod jsonfile;
pub mod layout;
pub mod list;
pub mod manifest;
pub mod registry;
pub mod report;
pub mod restore;
pub mod restore_stream;
pub mod transfer;
pub mod verify;

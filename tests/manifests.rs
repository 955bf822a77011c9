//! The deployment files are part of the product: `jobs/` (RBAC, PVC, backup
//! and restore Jobs), `k8up/` (Schedule, PreBackupPod, Restore), the
//! `Containerfile` and the commands of `docs/deploy-openshift.md`.
//!
//! No API server can run here, so these tests check what an API server and
//! the archiver would reject, offline:
//! - every YAML document parses and has a known kind;
//! - Kubernetes objects deserialize into their `k8s-openapi` types, and no
//!   field is lost on the way (a misspelled field is silently dropped by the
//!   API server; here it fails);
//! - K8up objects validate against the CRD schemas in `../shared/k8up-crds`,
//!   made strict about unknown fields (what `oc apply --validate=strict`
//!   does; the API server would otherwise prune them silently);
//! - every command line that runs the archiver parses with its own CLI;
//! - pods are admissible under OpenShift's `restricted-v2` SCC;
//! - the backup's RBAC cannot write images, names resolve across files.
//!
//! Each checker returns its problems, and has a test showing that it does
//! reject a broken input, so no test here can pass by checking nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser};
use imagestream_archiver::cli::{Cli, Command, Output};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{
    Container, PersistentVolumeClaim, Pod, PodSpec, PodTemplateSpec, Secret, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const CRD_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/k8up-crds");

const BINARY: &str = "imagestream-archiver";
const BINARY_PATH: &str = "/usr/local/bin/imagestream-archiver";
const IMAGE: &str = "quay.io/imagestream-archiver/imagestream-archiver:latest";
const NAMESPACE: &str = "imagestream-archiver";
const ARCHIVE_PVC: &str = "imagestream-archive";
const RESTORED_PVC: &str = "imagestream-archive-restored";
const BACKUP_SA: &str = "imagestream-archiver";
const RESTORE_SA: &str = "imagestream-restorer";
const K8UP_BACKUP_ANNOTATION: &str = "k8up.io/backup";

// ---------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------

/// One YAML document of one manifest file.
#[derive(Clone)]
struct Doc {
    /// Path relative to the repository root.
    file: String,
    /// Position of the document in its file.
    index: usize,
    value: Value,
}

impl Doc {
    fn str_at(&self, pointer: &str) -> &str {
        self.value
            .pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or("")
    }
    fn api_version(&self) -> &str {
        self.str_at("/apiVersion")
    }
    fn kind(&self) -> &str {
        self.str_at("/kind")
    }
    fn name(&self) -> &str {
        let name = self.str_at("/metadata/name");
        if name.is_empty() {
            self.str_at("/metadata/generateName")
        } else {
            name
        }
    }
    /// Where the document is, for messages.
    fn at(&self) -> String {
        format!(
            "{}#{} ({} {})",
            self.file,
            self.index,
            self.kind(),
            self.name()
        )
    }
}

/// Every `.yaml`/`.yml` file under `dir`, recursively, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries =
            fs::read_dir(&d).unwrap_or_else(|e| panic!("cannot read {}: {e}", d.display()));
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            ) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The documents of a multi-document YAML text; empty documents (only
/// comments, or a trailing `---`) are skipped, as `oc apply` does.
fn parse_documents(text: &str) -> Result<Vec<Value>, String> {
    let mut docs = Vec::new();
    for de in serde_norway::Deserializer::from_str(text) {
        let value = Value::deserialize(de).map_err(|e| e.to_string())?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

fn load_docs() -> Vec<Doc> {
    let mut docs = Vec::new();
    for dir in ["jobs", "k8up"] {
        let files = yaml_files(&Path::new(ROOT).join(dir));
        assert!(!files.is_empty(), "no YAML files under {dir}/");
        for path in files {
            let rel = path
                .strip_prefix(ROOT)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let text = fs::read_to_string(&path).unwrap();
            let values =
                parse_documents(&text).unwrap_or_else(|e| panic!("{rel} is not valid YAML: {e}"));
            assert!(!values.is_empty(), "{rel} holds no document");
            for (index, value) in values.into_iter().enumerate() {
                assert!(value.is_object(), "{rel}#{index} is not a mapping: {value}");
                docs.push(Doc {
                    file: rel.clone(),
                    index,
                    value,
                });
            }
        }
    }
    docs
}

// ---------------------------------------------------------------------------
// Typed parsing with lost-field detection
// ---------------------------------------------------------------------------

/// Keys of `original` that did not survive `original -> T -> JSON`: the
/// fields `T` does not know, i.e. misspelled or misplaced ones.
fn lost_fields(original: &Value, back: &Value, path: &str, out: &mut Vec<String>) {
    match (original, back) {
        (Value::Object(o), Value::Object(b)) => {
            for (key, value) in o {
                let here = format!("{path}.{key}");
                match b.get(key) {
                    Some(bv) => lost_fields(value, bv, &here, out),
                    None => out.push(here),
                }
            }
        }
        (Value::Array(o), Value::Array(b)) => {
            if o.len() != b.len() {
                out.push(format!("{path} (length {} became {})", o.len(), b.len()));
            }
            for (i, (ov, bv)) in o.iter().zip(b).enumerate() {
                lost_fields(ov, bv, &format!("{path}[{i}]"), out);
            }
        }
        (Value::Object(_) | Value::Array(_), other) => {
            out.push(format!("{path} (became {other})"));
        }
        _ => {}
    }
}

/// `value` as a `T`, or every reason it is not one exactly.
fn try_typed<T: DeserializeOwned + Serialize>(value: &Value) -> Result<T, String> {
    let typed: T = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let mut lost = Vec::new();
    lost_fields(value, &back, "", &mut lost);
    if lost.is_empty() {
        Ok(typed)
    } else {
        Err(format!(
            "fields unknown to {}: {}",
            std::any::type_name::<T>(),
            lost.join(", ")
        ))
    }
}

fn typed<T: DeserializeOwned + Serialize>(doc: &Doc) -> T {
    try_typed(&doc.value).unwrap_or_else(|e| panic!("{}: {e}", doc.at()))
}

// ---------------------------------------------------------------------------
// All objects, typed
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Manifests {
    service_accounts: Vec<(Doc, ServiceAccount)>,
    cluster_roles: Vec<(Doc, ClusterRole)>,
    cluster_role_bindings: Vec<(Doc, ClusterRoleBinding)>,
    roles: Vec<(Doc, Role)>,
    role_bindings: Vec<(Doc, RoleBinding)>,
    pvcs: Vec<(Doc, PersistentVolumeClaim)>,
    jobs: Vec<(Doc, Job)>,
    cron_jobs: Vec<(Doc, CronJob)>,
    secrets: Vec<(Doc, Secret)>,
    /// K8up objects: validated against their CRDs, kept as JSON.
    k8up: Vec<Doc>,
    kustomizations: Vec<Doc>,
}

impl Manifests {
    fn load() -> Self {
        let mut m = Manifests::default();
        for doc in load_docs() {
            match (doc.api_version(), doc.kind()) {
                ("v1", "ServiceAccount") => m.service_accounts.push((doc.clone(), typed(&doc))),
                ("v1", "PersistentVolumeClaim") => m.pvcs.push((doc.clone(), typed(&doc))),
                ("v1", "Secret") => m.secrets.push((doc.clone(), typed(&doc))),
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                    m.cluster_roles.push((doc.clone(), typed(&doc)))
                }
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                    m.cluster_role_bindings.push((doc.clone(), typed(&doc)))
                }
                ("rbac.authorization.k8s.io/v1", "Role") => {
                    m.roles.push((doc.clone(), typed(&doc)))
                }
                ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
                    m.role_bindings.push((doc.clone(), typed(&doc)))
                }
                ("batch/v1", "Job") => m.jobs.push((doc.clone(), typed(&doc))),
                ("batch/v1", "CronJob") => m.cron_jobs.push((doc.clone(), typed(&doc))),
                ("k8up.io/v1", "Schedule" | "PreBackupPod" | "Restore") => m.k8up.push(doc),
                ("kustomize.config.k8s.io/v1beta1", "Kustomization") => m.kustomizations.push(doc),
                (api, kind) => panic!(
                    "{}: no check knows {api} {kind}; add it to the tests",
                    doc.at()
                ),
            }
        }
        m
    }

    fn k8up_of(&self, kind: &str) -> Vec<&Doc> {
        self.k8up.iter().filter(|d| d.kind() == kind).collect()
    }

    fn pvc(&self, name: &str) -> &PersistentVolumeClaim {
        self.pvcs
            .iter()
            .find(|(_, p)| p.metadata.name.as_deref() == Some(name))
            .map(|(_, p)| p)
            .unwrap_or_else(|| panic!("no PersistentVolumeClaim {name} in the manifests"))
    }

    /// The PreBackupPod's pod template, typed.
    fn pre_backup_pods(&self) -> Vec<(&Doc, PodTemplateSpec)> {
        self.k8up_of("PreBackupPod")
            .into_iter()
            .map(|doc| {
                let pod = doc.value.pointer("/spec/pod").cloned().unwrap_or_default();
                let typed = try_typed::<PodTemplateSpec>(&pod)
                    .unwrap_or_else(|e| panic!("{} spec.pod: {e}", doc.at()));
                (doc, typed)
            })
            .collect()
    }

    /// Every pod spec the manifests would run, with where it comes from.
    fn pod_specs(&self) -> Vec<(String, PodSpec)> {
        let mut out = Vec::new();
        for (doc, job) in &self.jobs {
            let spec = job.spec.as_ref().and_then(|s| s.template.spec.clone());
            out.push((
                doc.at(),
                spec.unwrap_or_else(|| panic!("{}: no pod", doc.at())),
            ));
        }
        for (doc, cj) in &self.cron_jobs {
            let spec = cj
                .spec
                .job_template
                .spec
                .as_ref()
                .and_then(|s| s.template.spec.clone());
            out.push((
                doc.at(),
                spec.unwrap_or_else(|| panic!("{}: no pod", doc.at())),
            ));
        }
        for (doc, template) in self.pre_backup_pods() {
            let spec = template
                .spec
                .unwrap_or_else(|| panic!("{}: no pod", doc.at()));
            out.push((doc.at(), spec));
        }
        out
    }
}

// ---------------------------------------------------------------------------
// CRD schemas
// ---------------------------------------------------------------------------

/// Makes a CRD's structural schema strict: every object schema that lists
/// `properties` rejects other keys (unless it preserves unknown fields), and
/// the `x-kubernetes-*` extensions, which mean nothing to JSON Schema, go.
/// Only keyword positions are walked, so a field that happens to be called
/// `items` or `properties` is not mistaken for a keyword.
fn strict_schema(schema: &mut Value) {
    let Some(obj) = schema.as_object_mut() else {
        return;
    };
    let preserves = obj
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    obj.retain(|k, _| !k.starts_with("x-kubernetes-"));
    if let Some(Value::Object(props)) = obj.get_mut("properties") {
        for sub in props.values_mut() {
            strict_schema(sub);
        }
        if !preserves && !obj.contains_key("additionalProperties") {
            obj.insert("additionalProperties".into(), Value::Bool(false));
        }
    }
    if let Some(ap @ Value::Object(_)) = obj.get_mut("additionalProperties") {
        strict_schema(ap);
    }
    match obj.get_mut("items") {
        Some(Value::Array(items)) => items.iter_mut().for_each(strict_schema),
        Some(items) => strict_schema(items),
        None => {}
    }
    for key in ["anyOf", "allOf", "oneOf"] {
        if let Some(Value::Array(subs)) = obj.get_mut(key) {
            subs.iter_mut().for_each(strict_schema);
        }
    }
    if let Some(not) = obj.get_mut("not") {
        strict_schema(not);
    }
}

/// A validator for `kind` (e.g. `Schedule`) at version `v1`, from the CRD file.
struct CrdValidator {
    kind: String,
    validator: jsonschema::Validator,
}

impl CrdValidator {
    fn load(file: &str, kind: &str) -> Self {
        let dir = Path::new(CRD_DIR);
        assert!(
            dir.is_dir(),
            "the K8up CRD schemas are missing: expected {} (the shared/ directory beside the repository)",
            dir.display()
        );
        let path = dir.join(file);
        let text = fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let crd = parse_documents(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("{} is empty", path.display()));
        assert_eq!(
            crd.pointer("/spec/names/kind").and_then(Value::as_str),
            Some(kind),
            "{} is not the CRD of {kind}",
            path.display()
        );
        let version = crd
            .pointer("/spec/versions")
            .and_then(Value::as_array)
            .and_then(|vs| {
                vs.iter()
                    .find(|v| v.get("name").and_then(Value::as_str) == Some("v1"))
            })
            .unwrap_or_else(|| panic!("{} has no version v1", path.display()));
        let mut schema = version
            .pointer("/schema/openAPIV3Schema")
            .cloned()
            .unwrap_or_else(|| panic!("{} has no openAPIV3Schema", path.display()));
        strict_schema(&mut schema);
        // OpenAPI v3.0 schemas are closest to JSON Schema draft 4.
        let validator = jsonschema::draft4::new(&schema)
            .unwrap_or_else(|e| panic!("{}: schema does not compile: {e}", path.display()));
        CrdValidator {
            kind: kind.to_owned(),
            validator,
        }
    }

    fn for_kind(kind: &str) -> Self {
        let file = match kind {
            "Schedule" => "k8up.io_schedules.yaml",
            "PreBackupPod" => "k8up.io_prebackuppods.yaml",
            "Restore" => "k8up.io_restores.yaml",
            "Backup" => "k8up.io_backups.yaml",
            other => panic!("no CRD known for {other}"),
        };
        Self::load(file, kind)
    }

    /// Schema violations of `object`, plus the ones of its `metadata`,
    /// which CRD schemas leave open and the API server checks as ObjectMeta.
    fn problems(&self, object: &Value) -> Vec<String> {
        let mut out: Vec<String> = self
            .validator
            .iter_errors(object)
            .map(|e| format!("{}: {e}", e.instance_path()))
            .collect();
        if object.get("apiVersion") != Some(&json!("k8up.io/v1")) {
            out.push("apiVersion is not k8up.io/v1".into());
        }
        if object.get("kind") != Some(&json!(self.kind)) {
            out.push(format!("kind is not {}", self.kind));
        }
        match object.get("metadata") {
            Some(meta) => {
                if let Err(e) = try_typed::<ObjectMeta>(meta) {
                    out.push(format!("/metadata: {e}"));
                }
            }
            None => out.push("no metadata".into()),
        }
        out
    }
}

// ---------------------------------------------------------------------------
// Command lines
// ---------------------------------------------------------------------------

/// The command line a container runs: `command` replaces the image's
/// ENTRYPOINT (the binary, see `containerfile_matches_the_manifests`).
fn container_argv(c: &Container) -> Vec<String> {
    let args = c.args.clone().unwrap_or_default();
    match &c.command {
        Some(cmd) => cmd.iter().cloned().chain(args).collect(),
        None => std::iter::once(BINARY.to_owned()).chain(args).collect(),
    }
}

fn runs_archiver(argv: &[String]) -> bool {
    matches!(argv.first().map(String::as_str), Some(BINARY | BINARY_PATH))
}

/// `argv` through the binary's own parser.
fn parse_cli(argv: &[String]) -> Result<Cli, String> {
    if !runs_archiver(argv) {
        return Err(format!("{argv:?} does not run {BINARY}"));
    }
    Cli::try_parse_from(argv).map_err(|e| format!("{argv:?}: {e}"))
}

/// Words that a shell would interpret but K8up's exec (which splits the
/// command into words itself, without a shell) passes on literally.
fn shell_syntax(words: &[String]) -> Vec<String> {
    words
        .iter()
        .filter(|w| {
            w.starts_with(['|', '>', '<', '&', ';'])
                || w.contains('$')
                || w.contains('`')
                || w.starts_with("2>")
        })
        .cloned()
        .collect()
}

fn verb(cli: &Cli) -> &'static str {
    match cli.command {
        Command::Backup(_) => "backup",
        Command::Restore(_) => "restore",
        Command::Verify(_) => "verify",
        Command::List(_) => "list",
        Command::Gc(_) => "gc",
        Command::Export(_) => "export",
        Command::Import(_) => "import",
    }
}

/// A command line found somewhere, and where.
struct Invocation {
    at: String,
    argv: Vec<String>,
}

/// The PreBackupPod's `backupCommand`, split into words as K8up does.
fn backup_command(doc: &Doc) -> Vec<String> {
    let cmd = doc.str_at("/spec/backupCommand");
    assert!(!cmd.is_empty(), "{}: no backupCommand", doc.at());
    shell_words::split(cmd).unwrap_or_else(|e| panic!("{}: backupCommand: {e}", doc.at()))
}

/// Every archiver command line in Jobs, CronJobs and PreBackupPods.
fn manifest_invocations(m: &Manifests) -> Vec<Invocation> {
    let mut out = Vec::new();
    for (at, spec) in m.pod_specs() {
        for c in spec
            .init_containers
            .iter()
            .flatten()
            .chain(spec.containers.iter())
        {
            let argv = container_argv(c);
            if runs_archiver(&argv) {
                out.push(Invocation {
                    at: format!("{at} container {}", c.name),
                    argv,
                });
            }
        }
    }
    for doc in m.k8up_of("PreBackupPod") {
        out.push(Invocation {
            at: format!("{} backupCommand", doc.at()),
            argv: backup_command(doc),
        });
    }
    out
}

fn docs_text() -> String {
    let path = Path::new(ROOT).join("docs/deploy-openshift.md");
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The fenced code blocks of a Markdown text: (info string, body).
fn code_blocks(markdown: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in markdown.lines() {
        let trimmed = line.trim_start();
        if let Some(info) = trimmed.strip_prefix("```") {
            match current.take() {
                Some(block) => out.push(block),
                None => current = Some((info.trim().to_owned(), String::new())),
            }
        } else if let Some((_, body)) = current.as_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    assert!(current.is_none(), "unterminated code block in the docs");
    out
}

/// Archiver command lines in the shell blocks of the docs: the words from
/// `imagestream-archiver VERB` up to the first shell operator.
fn docs_invocations(markdown: &str) -> Vec<Invocation> {
    let verbs: BTreeSet<String> = Cli::command()
        .get_subcommands()
        .map(|s| s.get_name().to_owned())
        .collect();
    let mut out = Vec::new();
    for (info, body) in code_blocks(markdown) {
        if !matches!(info.as_str(), "sh" | "bash" | "shell" | "console") {
            continue;
        }
        let joined = body.replace("\\\n", " ");
        for line in joined.lines() {
            let line = line.trim().trim_start_matches("$ ");
            if line.starts_with('#') || !line.contains(BINARY) {
                continue;
            }
            let words = shell_words::split(line)
                .unwrap_or_else(|e| panic!("docs: cannot split `{line}`: {e}"));
            for (i, w) in words.iter().enumerate() {
                let is_binary = w == BINARY || w == BINARY_PATH;
                let next_is_verb = words.get(i + 1).is_some_and(|n| verbs.contains(n));
                let after_option = i > 0 && words[i - 1].starts_with('-') && words[i - 1] != "--";
                if !is_binary || !next_is_verb || after_option {
                    continue;
                }
                let argv: Vec<String> = words[i..]
                    .iter()
                    .take_while(|w| shell_syntax(std::slice::from_ref(w)).is_empty())
                    .cloned()
                    .collect();
                out.push(Invocation {
                    at: format!("docs: `{line}`"),
                    argv,
                });
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// restricted-v2
// ---------------------------------------------------------------------------

/// Why OpenShift's `restricted-v2` SCC would not admit `spec` as written,
/// or would admit it only by changing it (a fixed UID is outside the
/// namespace's range; a writable root filesystem is not what we ship).
fn restricted_v2_problems(spec: &PodSpec) -> Vec<String> {
    let mut out = Vec::new();
    let pod_sc = spec.security_context.clone().unwrap_or_default();
    if pod_sc.run_as_user.is_some() {
        out.push("pod sets runAsUser: restricted-v2 assigns a UID from the namespace range".into());
    }
    if pod_sc.run_as_group.is_some() {
        out.push("pod sets runAsGroup".into());
    }
    if pod_sc.fs_group.is_some() {
        out.push("pod sets fsGroup: restricted-v2 assigns it from the namespace range".into());
    }
    if pod_sc.se_linux_options.is_some() {
        out.push("pod sets seLinuxOptions".into());
    }
    for (flag, name) in [
        (spec.host_network, "hostNetwork"),
        (spec.host_pid, "hostPID"),
        (spec.host_ipc, "hostIPC"),
    ] {
        if flag == Some(true) {
            out.push(format!("pod uses {name}"));
        }
    }
    let volumes = spec.volumes.clone().unwrap_or_default();
    for v in &volumes {
        let allowed = v.persistent_volume_claim.is_some()
            || v.empty_dir.is_some()
            || v.config_map.is_some()
            || v.secret.is_some()
            || v.projected.is_some()
            || v.downward_api.is_some()
            || v.ephemeral.is_some();
        if !allowed {
            out.push(format!(
                "volume {} has a type restricted-v2 forbids",
                v.name
            ));
        }
    }
    let containers = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers);
    for c in containers {
        let n = &c.name;
        let sc = c.security_context.clone().unwrap_or_default();
        if sc.run_as_user.is_some() {
            out.push(format!("container {n} sets runAsUser"));
        }
        let non_root = sc.run_as_non_root.or(pod_sc.run_as_non_root);
        if non_root != Some(true) {
            out.push(format!("container {n} is not runAsNonRoot: true"));
        }
        let seccomp = sc
            .seccomp_profile
            .as_ref()
            .or(pod_sc.seccomp_profile.as_ref())
            .map(|p| p.type_.as_str());
        if seccomp != Some("RuntimeDefault") {
            out.push(format!(
                "container {n} has no RuntimeDefault seccomp profile"
            ));
        }
        if sc.allow_privilege_escalation != Some(false) {
            out.push(format!(
                "container {n} does not set allowPrivilegeEscalation: false"
            ));
        }
        if sc.privileged == Some(true) {
            out.push(format!("container {n} is privileged"));
        }
        let caps = sc.capabilities.clone().unwrap_or_default();
        if !caps.drop.unwrap_or_default().iter().any(|c| c == "ALL") {
            out.push(format!("container {n} does not drop ALL capabilities"));
        }
        if !caps.add.unwrap_or_default().is_empty() {
            out.push(format!("container {n} adds capabilities"));
        }
        if sc.read_only_root_filesystem != Some(true) {
            out.push(format!("container {n} has a writable root filesystem"));
        }
        // With a read-only root filesystem, /tmp must be a volume.
        let tmp = c
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == "/tmp");
        match tmp {
            Some(m)
                if volumes
                    .iter()
                    .any(|v| v.name == m.name && v.empty_dir.is_some()) => {}
            _ => out.push(format!("container {n} has no emptyDir at /tmp")),
        }
        let res = c.resources.clone().unwrap_or_default();
        let has = |map: &Option<BTreeMap<_, _>>, key: &str| {
            map.as_ref().is_some_and(|m| m.contains_key(key))
        };
        if !has(&res.requests, "memory") || !has(&res.limits, "memory") {
            out.push(format!("container {n} lacks a memory request or limit"));
        }
    }
    out
}

// ---------------------------------------------------------------------------
// RBAC
// ---------------------------------------------------------------------------

/// A rule that applies to a service account, and its scope.
#[derive(Clone, Debug)]
struct Grant {
    rule: PolicyRule,
    cluster_wide: bool,
    via: String,
}

const READ_VERBS: [&str; 3] = ["get", "list", "watch"];

fn is_sa(subject_kind: &str, name: &Option<String>, ns: &Option<String>, sa: &str) -> bool {
    subject_kind == "ServiceAccount"
        && name.as_deref() == Some(sa)
        && ns.as_deref() == Some(NAMESPACE)
}

/// Every rule bound to service account `sa` by the manifests' bindings.
fn grants_for(m: &Manifests, sa: &str) -> Vec<Grant> {
    let cluster_role = |name: &str| -> Vec<PolicyRule> {
        m.cluster_roles
            .iter()
            .find(|(_, r)| r.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("binding refers to ClusterRole {name}, not in the manifests"))
            .1
            .rules
            .clone()
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for (doc, b) in &m.cluster_role_bindings {
        let bound = b
            .subjects
            .iter()
            .flatten()
            .any(|s| is_sa(&s.kind, &Some(s.name.clone()), &s.namespace, sa));
        if bound {
            assert_eq!(b.role_ref.kind, "ClusterRole", "{}", doc.at());
            for rule in cluster_role(&b.role_ref.name) {
                out.push(Grant {
                    rule,
                    cluster_wide: true,
                    via: doc.at(),
                });
            }
        }
    }
    for (doc, b) in &m.role_bindings {
        let bound = b
            .subjects
            .iter()
            .flatten()
            .any(|s| is_sa(&s.kind, &Some(s.name.clone()), &s.namespace, sa));
        if !bound {
            continue;
        }
        let rules = match b.role_ref.kind.as_str() {
            "ClusterRole" => cluster_role(&b.role_ref.name),
            "Role" => m
                .roles
                .iter()
                .find(|(_, r)| {
                    r.metadata.name.as_deref() == Some(b.role_ref.name.as_str())
                        && r.metadata.namespace == b.metadata.namespace
                })
                .unwrap_or_else(|| panic!("{}: Role {} not found", doc.at(), b.role_ref.name))
                .1
                .rules
                .clone()
                .unwrap_or_default(),
            other => panic!("{}: roleRef kind {other}", doc.at()),
        };
        for rule in rules {
            out.push(Grant {
                rule,
                cluster_wide: false,
                via: doc.at(),
            });
        }
    }
    out
}

/// Whether some grant allows `verb` on `group`/`resource`, cluster-wide if asked.
fn allows(grants: &[Grant], group: &str, resource: &str, verb: &str, cluster_wide: bool) -> bool {
    grants.iter().any(|g| {
        let r = &g.rule;
        let has = |list: &Option<Vec<String>>, want: &str| {
            list.iter().flatten().any(|x| x == want || x == "*")
        };
        has(&r.api_groups, group)
            && has(&r.resources, resource)
            && (r.verbs.iter().any(|v| v == verb || v == "*"))
            && (!cluster_wide || g.cluster_wide)
    })
}

/// What the backup identity may do beyond reading: only get/patch its own
/// archive claim, in its own namespace.
fn backup_rbac_problems(grants: &[Grant]) -> Vec<String> {
    let mut out = Vec::new();
    for g in grants {
        let r = &g.rule;
        let lists = [&r.api_groups, &r.resources, &r.resource_names];
        if r.verbs.iter().any(|v| v == "*")
            || lists.iter().any(|l| l.iter().flatten().any(|x| x == "*"))
        {
            out.push(format!("{}: wildcard in {r:?}", g.via));
        }
        let writes: Vec<&String> = r
            .verbs
            .iter()
            .filter(|v| !READ_VERBS.contains(&v.as_str()))
            .collect();
        if writes.is_empty() {
            continue;
        }
        let own_claim = r.resources.as_deref() == Some(&["persistentvolumeclaims".to_owned()][..])
            && r.resource_names.as_deref() == Some(&[ARCHIVE_PVC.to_owned()][..])
            && writes.iter().all(|v| *v == "patch")
            && !g.cluster_wide;
        if !own_claim {
            out.push(format!(
                "{}: backup may {writes:?} {:?} {:?}",
                g.via, r.resources, r.resource_names
            ));
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Tests: parsing and types
// ---------------------------------------------------------------------------

#[test]
fn every_manifest_parses_into_its_type() {
    let m = Manifests::load();
    // The set of objects the deployment consists of; a file that goes
    // missing (or a kind that changes) shows up here.
    assert_eq!(m.service_accounts.len(), 2);
    assert_eq!(m.pvcs.len(), 2);
    assert_eq!(m.jobs.len(), 2, "one-shot backup Job and restore Job");
    assert_eq!(m.cron_jobs.len(), 1);
    assert_eq!(m.k8up_of("Schedule").len(), 1);
    assert_eq!(m.k8up_of("PreBackupPod").len(), 1);
    assert_eq!(m.k8up_of("Restore").len(), 1);
    assert_eq!(m.kustomizations.len(), 1);
    assert!(!m.secrets.is_empty());
}

#[test]
fn yaml_documents_are_split_and_empty_ones_skipped() {
    let docs = parse_documents("# only a comment\n---\na: 1\n---\nb: [2]\n---\n").unwrap();
    assert_eq!(docs, vec![json!({"a": 1}), json!({"b": [2]})]);
    assert!(parse_documents("a: [1\n").is_err());
}

#[test]
fn lost_field_check_catches_a_misspelled_kubernetes_field() {
    let good = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {"containers": [{
            "name": "c",
            "securityContext": {"readOnlyRootFilesystem": true}
        }]}
    });
    try_typed::<Pod>(&good).unwrap();
    let mut bad = good.clone();
    bad["spec"]["containers"][0]["securityContext"] = json!({"readOnlyRootFileSystem": true});
    let err = try_typed::<Pod>(&bad).unwrap_err();
    assert!(
        err.contains(".spec.containers[0].securityContext.readOnlyRootFileSystem"),
        "{err}"
    );
    let mut wrong_kind = good;
    wrong_kind["kind"] = json!("Job");
    assert!(try_typed::<Pod>(&wrong_kind).is_err());
}

#[test]
fn namespaced_objects_live_in_the_archiver_namespace() {
    let m = Manifests::load();
    let namespaced: Vec<(&Doc, &ObjectMeta)> = m
        .service_accounts
        .iter()
        .map(|(d, o)| (d, &o.metadata))
        .chain(m.roles.iter().map(|(d, o)| (d, &o.metadata)))
        .chain(m.role_bindings.iter().map(|(d, o)| (d, &o.metadata)))
        .chain(m.pvcs.iter().map(|(d, o)| (d, &o.metadata)))
        .chain(m.jobs.iter().map(|(d, o)| (d, &o.metadata)))
        .chain(m.cron_jobs.iter().map(|(d, o)| (d, &o.metadata)))
        .chain(m.secrets.iter().map(|(d, o)| (d, &o.metadata)))
        .collect();
    for (doc, meta) in namespaced {
        assert_eq!(meta.namespace.as_deref(), Some(NAMESPACE), "{}", doc.at());
    }
    for doc in &m.k8up {
        assert_eq!(doc.str_at("/metadata/namespace"), NAMESPACE, "{}", doc.at());
    }
    let cluster_scoped = m.cluster_roles.iter().map(|(d, o)| (d, &o.metadata)).chain(
        m.cluster_role_bindings
            .iter()
            .map(|(d, o)| (d, &o.metadata)),
    );
    for (doc, meta) in cluster_scoped {
        assert_eq!(meta.namespace, None, "{} is cluster-scoped", doc.at());
    }
    // Jobs are created, not applied: generateName lets a second restore or
    // backup run without deleting the first Job.
    for (doc, job) in &m.jobs {
        assert!(job.metadata.generate_name.is_some(), "{}", doc.at());
    }
}

// ---------------------------------------------------------------------------
// Tests: K8up
// ---------------------------------------------------------------------------

#[test]
fn k8up_objects_validate_against_their_crds() {
    let m = Manifests::load();
    assert!(!m.k8up.is_empty());
    for doc in &m.k8up {
        let problems = CrdValidator::for_kind(doc.kind()).problems(&doc.value);
        assert!(
            problems.is_empty(),
            "{}:\n  {}",
            doc.at(),
            problems.join("\n  ")
        );
    }
}

#[test]
fn crd_validation_rejects_misspelled_and_mistyped_fields() {
    let m = Manifests::load();
    let schedule = m.k8up_of("Schedule")[0].value.clone();
    let v = CrdValidator::for_kind("Schedule");
    assert!(v.problems(&schedule).is_empty());

    let mut misspelled = schedule.clone();
    misspelled["spec"]["backup"]["schedulee"] = json!("0 2 * * *");
    let problems = v.problems(&misspelled);
    assert!(
        problems.iter().any(|p| p.contains("schedulee")),
        "{problems:?}"
    );

    let mut nested = schedule.clone();
    nested["spec"]["backend"]["s3"]["accessKeyIdSecretRef"] = json!({"name": "x", "key": "y"});
    assert!(!v.problems(&nested).is_empty());

    let mut mistyped = schedule.clone();
    mistyped["spec"]["prune"]["retention"]["keepDaily"] = json!("seven");
    assert!(!v.problems(&mistyped).is_empty());

    let mut bad_meta = schedule;
    bad_meta["metadata"]["annotation"] = json!({"a": "b"});
    assert!(!v.problems(&bad_meta).is_empty());

    // The pod inside a PreBackupPod is checked by the CRD too.
    let pbp = m.k8up_of("PreBackupPod")[0].value.clone();
    let v = CrdValidator::for_kind("PreBackupPod");
    let mut bad_pod = pbp;
    bad_pod["spec"]["pod"]["spec"]["containers"][0]["volumeMount"] = json!([]);
    assert!(!v.problems(&bad_pod).is_empty());
}

#[test]
fn strict_schema_leaves_maps_and_extensions_alone() {
    let mut schema = json!({
        "type": "object",
        "properties": {
            "items": {"type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true,
                     "properties": {"a": {"type": "string"}}},
            "list": {"type": "array", "x-kubernetes-list-type": "atomic",
                     "items": {"type": "object", "properties": {"n": {"type": "string"}}}}
        }
    });
    strict_schema(&mut schema);
    let v = jsonschema::draft4::new(&schema).unwrap();
    assert!(v.is_valid(&json!({"items": "x", "labels": {"any": "thing"}, "free": {"b": 1}})));
    assert!(!v.is_valid(&json!({"other": 1})));
    assert!(!v.is_valid(&json!({"list": [{"m": "x"}]})));
    assert!(!schema.to_string().contains("x-kubernetes"));
}

#[test]
fn pre_backup_pod_reports_on_stdout_and_idles_between_backups() {
    let m = Manifests::load();
    for (doc, template) in m.pre_backup_pods() {
        assert_eq!(doc.str_at("/spec/fileExtension"), ".json", "{}", doc.at());
        let words = backup_command(doc);
        // K8up splits the command into words and execs it without a shell.
        assert_eq!(shell_syntax(&words), Vec::<String>::new(), "{}", doc.at());
        let cli = parse_cli(&words).unwrap_or_else(|e| panic!("{}: {e}", doc.at()));
        // K8up runs it while restic walks the claim: it must not write (a
        // commit between restic's listing of blobs/ and its read of
        // index.json would leave an inconsistent snapshot). K8up stores
        // stdout in the snapshot: the listing, as JSON.
        let Command::List(args) = &cli.command else {
            panic!("{}: backupCommand writes; it must only read", doc.at());
        };
        assert_eq!(args.archive, Path::new("/archive"), "{}", doc.at());
        assert!(matches!(args.output, Output::Json), "{}", doc.at());

        // The pod is a Deployment replica that K8up execs into: its main
        // process must idle, not run (and end) a backup of its own.
        let spec = template.spec.expect("pod spec");
        assert_eq!(spec.service_account_name.as_deref(), Some(BACKUP_SA));
        assert_eq!(
            spec.restart_policy, None,
            "Deployments need restartPolicy Always"
        );
        for c in &spec.containers {
            assert!(
                !runs_archiver(&container_argv(c)),
                "{}: container {} runs the archiver",
                doc.at(),
                c.name
            );
        }
        let mounts: Vec<_> = mounted_claims(&spec);
        assert!(
            mounts.contains(&(ARCHIVE_PVC.to_owned(), "/archive".to_owned())),
            "{mounts:?}"
        );
    }
}

#[test]
fn restore_names_a_snapshot_and_fills_the_restored_claim() {
    let m = Manifests::load();
    let restores = m.k8up_of("Restore");
    assert_eq!(restores.len(), 1);
    let doc = restores[0];
    assert_eq!(
        doc.str_at("/spec/restoreMethod/folder/claimName"),
        RESTORED_PVC
    );
    // Without a snapshot ID K8up restores the newest snapshot of the
    // repository, which can be the PreBackupPod's report instead of the PVC.
    assert!(!doc.str_at("/spec/snapshot").is_empty(), "{}", doc.at());
    // The restore reads the repository the Schedule writes.
    let schedule = m.k8up_of("Schedule")[0];
    assert_eq!(
        doc.value.pointer("/spec/backend"),
        schedule.value.pointer("/spec/backend"),
        "Restore and Schedule use different backends"
    );
}

#[test]
fn schedule_backs_up_checks_and_prunes() {
    let m = Manifests::load();
    let doc = m.k8up_of("Schedule")[0];
    for part in ["backup", "check", "prune"] {
        let cron = doc.str_at(&format!("/spec/{part}/schedule"));
        assert_eq!(
            cron.split_whitespace().count(),
            5,
            "{part}: `{cron}` is not a cron expression"
        );
    }
    for keep in ["keepDaily", "keepWeekly", "keepMonthly"] {
        let n = doc
            .value
            .pointer(&format!("/spec/prune/retention/{keep}"))
            .and_then(Value::as_u64);
        assert!(n.is_some_and(|n| n > 0), "retention.{keep}");
    }
    for key in ["/spec/backend/s3/endpoint", "/spec/backend/s3/bucket"] {
        assert!(!doc.str_at(key).is_empty(), "{key}");
    }
}

/// Every `*SecretRef` object under `value`, as (path, name, key).
fn secret_refs(value: &Value, path: &str, out: &mut Vec<(String, String, String)>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let here = format!("{path}/{k}");
                if k.ends_with("SecretRef") || k.ends_with("SecretReg") {
                    let s = |f: &str| v.get(f).and_then(Value::as_str).unwrap_or("").to_owned();
                    out.push((here.clone(), s("name"), s("key")));
                }
                secret_refs(v, &here, out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                secret_refs(v, &format!("{path}/{i}"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn k8up_secret_refs_match_the_example_secrets() {
    let m = Manifests::load();
    let keys: BTreeSet<(String, String)> = m
        .secrets
        .iter()
        .flat_map(|(_, s)| {
            let name = s.metadata.name.clone().unwrap_or_default();
            let data = s.data.iter().flatten().map(|(k, _)| k.clone());
            let string_data = s.string_data.iter().flatten().map(|(k, _)| k.clone());
            data.chain(string_data).map(move |k| (name.clone(), k))
        })
        .collect();
    let mut refs = Vec::new();
    for doc in &m.k8up {
        secret_refs(&doc.value, &doc.at(), &mut refs);
    }
    assert!(refs.len() >= 6, "{refs:?}");
    for (at, name, key) in refs {
        assert!(
            keys.contains(&(name.clone(), key.clone())),
            "{at}: no Secret {name} with key {key}"
        );
    }
    // The example Secrets must not look like real credentials.
    for (doc, s) in &m.secrets {
        for v in s.string_data.iter().flatten().map(|(_, v)| v) {
            assert!(
                v.starts_with("EXAMPLE"),
                "{}: {v} is not a placeholder",
                doc.at()
            );
        }
        assert!(
            s.data.is_none(),
            "{}: use stringData placeholders",
            doc.at()
        );
    }
}

// ---------------------------------------------------------------------------
// Tests: command lines
// ---------------------------------------------------------------------------

#[test]
fn every_archiver_command_line_parses_with_the_real_cli() {
    let m = Manifests::load();
    let mut invocations = manifest_invocations(&m);
    let from_manifests = invocations.len();
    invocations.extend(docs_invocations(&docs_text()));
    assert!(
        invocations.len() > from_manifests + 5,
        "the docs show fewer archiver commands than expected"
    );
    let mut verbs = BTreeSet::new();
    for inv in &invocations {
        let cli = parse_cli(&inv.argv).unwrap_or_else(|e| panic!("{}: {e}", inv.at));
        verbs.insert(verb(&cli));
        // A --pvc that is not the archive claim would be refused by the Role.
        if let Command::Backup(args) = &cli.command {
            if let Some(pvc) = &args.pvc {
                assert_eq!(pvc, ARCHIVE_PVC, "{}", inv.at);
            }
        }
    }
    for needed in ["backup", "restore", "verify", "list"] {
        assert!(verbs.contains(needed), "no `{needed}` anywhere: {verbs:?}");
    }
}

#[test]
fn jobs_run_the_verbs_their_service_accounts_allow() {
    let m = Manifests::load();
    for (at, spec) in m.pod_specs() {
        let sa = spec.service_account_name.clone().unwrap_or_default();
        for c in spec
            .init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
        {
            assert_eq!(c.image.as_deref(), Some(IMAGE), "{at} container {}", c.name);
            let argv = container_argv(c);
            if !runs_archiver(&argv) {
                continue;
            }
            let cli = parse_cli(&argv).unwrap_or_else(|e| panic!("{at}: {e}"));
            let expected_sa = match cli.command {
                Command::Restore(_) => RESTORE_SA,
                Command::Backup(_) => BACKUP_SA,
                _ => continue,
            };
            assert_eq!(sa, expected_sa, "{at}: {} runs as {sa}", verb(&cli));
        }
    }
    // And the restore Job really restores from the restored claim.
    let restore_jobs: Vec<_> = m
        .jobs
        .iter()
        .filter(|(_, j)| {
            let spec = j
                .spec
                .as_ref()
                .and_then(|s| s.template.spec.as_ref())
                .unwrap();
            spec.containers.iter().any(|c| {
                parse_cli(&container_argv(c))
                    .is_ok_and(|cli| matches!(cli.command, Command::Restore(_)))
            })
        })
        .collect();
    assert_eq!(restore_jobs.len(), 1);
    let spec = restore_jobs[0]
        .1
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    assert!(mounted_claims(spec).contains(&(RESTORED_PVC.to_owned(), "/archive".to_owned())));
}

#[test]
fn cli_check_rejects_what_the_binary_would_reject() {
    let ok = |s: &str| parse_cli(&shell_words::split(s).unwrap());
    ok("imagestream-archiver backup --archive /archive --pvc imagestream-archive").unwrap();
    ok("imagestream-archiver restore --archive /a --map-namespace a=b --apply-imagestreams")
        .unwrap();
    assert!(ok("imagestream-archiver backup --archve /archive").is_err());
    assert!(ok("imagestream-archiver backup --archive /a --pvc-namespace x").is_err());
    assert!(ok("imagestream-archiver restore --archive /a --from x").is_err());
    assert!(ok("imagestream-archiver snapshot --archive /a").is_err());
    assert!(ok("sleep infinity").is_err());
    let words = shell_words::split("imagestream-archiver backup --archive /a > /a/r.json").unwrap();
    assert_eq!(shell_syntax(&words), vec![">".to_owned()]);

    let docs = "```sh\noc -n imagestream-archiver get pods\n\
                imagestream-archiver list --archive /archive | head\n\
                oc run x --command -- imagestream-archiver \\\n  verify --archive /a\n```\n\
                ```sh\nimagestream-archiver backup --bogus\n```\n";
    let found = docs_invocations(docs);
    let argvs: Vec<String> = found.iter().map(|i| i.argv.join(" ")).collect();
    assert_eq!(
        argvs,
        [
            "imagestream-archiver list --archive /archive",
            "imagestream-archiver verify --archive /a",
            "imagestream-archiver backup --bogus"
        ]
    );
    assert!(parse_cli(&found[2].argv).is_err());
}

#[test]
fn object_examples_in_the_docs_are_valid() {
    let mut pods = 0;
    let mut others = 0;
    for (info, body) in code_blocks(&docs_text()) {
        let values = match info.as_str() {
            "json" => vec![serde_json::from_str::<Value>(&body)
                .unwrap_or_else(|e| panic!("docs JSON block: {e}\n{body}"))],
            "yaml" => {
                parse_documents(&body).unwrap_or_else(|e| panic!("docs YAML block: {e}\n{body}"))
            }
            _ => continue,
        };
        for value in values {
            let api = value
                .get("apiVersion")
                .and_then(Value::as_str)
                .unwrap_or("");
            let kind = value.get("kind").and_then(Value::as_str).unwrap_or("");
            match (api, kind) {
                ("v1", "Pod") => {
                    let pod: Pod =
                        try_typed(&value).unwrap_or_else(|e| panic!("docs Pod override: {e}"));
                    // The override is merged into the pod `oc run` generates,
                    // which restricted-v2 then completes; it must not undo any
                    // of that.
                    let spec = pod.spec.expect("spec");
                    for c in &spec.containers {
                        let sc = c.security_context.clone().unwrap_or_default();
                        assert_eq!(sc.allow_privilege_escalation, Some(false));
                        assert_eq!(sc.read_only_root_filesystem, Some(true));
                        assert_eq!(sc.run_as_user, None);
                    }
                    pods += 1;
                }
                ("v1", "PersistentVolumeClaim") => {
                    try_typed::<PersistentVolumeClaim>(&value)
                        .unwrap_or_else(|e| panic!("docs PVC: {e}"));
                    others += 1;
                }
                ("k8up.io/v1", kind) => {
                    let problems = CrdValidator::for_kind(kind).problems(&value);
                    assert!(problems.is_empty(), "docs {kind}: {problems:?}");
                    others += 1;
                }
                _ => panic!("docs: no check knows {api} {kind}; add it to the tests"),
            }
        }
    }
    assert!(pods >= 2, "the docs' `oc run` recipes have no Pod override");
    assert!(others >= 2, "the docs' PVC and Backup examples are missing");
}

// ---------------------------------------------------------------------------
// Tests: security
// ---------------------------------------------------------------------------

#[test]
fn pods_are_admissible_under_restricted_v2() {
    let m = Manifests::load();
    let specs = m.pod_specs();
    assert_eq!(specs.len(), 4, "CronJob, two Jobs, PreBackupPod");
    for (at, spec) in specs {
        let problems = restricted_v2_problems(&spec);
        assert!(problems.is_empty(), "{at}:\n  {}", problems.join("\n  "));
    }
}

#[test]
fn restricted_v2_check_rejects_root_and_missing_hardening() {
    let m = Manifests::load();
    let (_, good) = m.pod_specs().remove(0);
    assert!(restricted_v2_problems(&good).is_empty());

    let mut uid = good.clone();
    uid.security_context.as_mut().unwrap().run_as_user = Some(0);
    assert!(restricted_v2_problems(&uid)
        .iter()
        .any(|p| p.contains("runAsUser")));

    let mut caps = good.clone();
    caps.containers[0]
        .security_context
        .as_mut()
        .unwrap()
        .capabilities = None;
    assert!(restricted_v2_problems(&caps)
        .iter()
        .any(|p| p.contains("drop ALL")));

    let mut rw = good.clone();
    rw.containers[0]
        .security_context
        .as_mut()
        .unwrap()
        .read_only_root_filesystem = None;
    assert!(restricted_v2_problems(&rw)
        .iter()
        .any(|p| p.contains("writable root")));

    let mut root = good.clone();
    root.security_context.as_mut().unwrap().run_as_non_root = None;
    assert!(restricted_v2_problems(&root)
        .iter()
        .any(|p| p.contains("runAsNonRoot")));

    let mut no_tmp = good;
    no_tmp.containers[0]
        .volume_mounts
        .as_mut()
        .unwrap()
        .retain(|v| v.mount_path != "/tmp");
    assert!(restricted_v2_problems(&no_tmp)
        .iter()
        .any(|p| p.contains("/tmp")));
}

#[test]
fn archive_pvc_is_rwo_and_in_k8up_backups_and_the_restored_one_is_not() {
    let m = Manifests::load();
    for (name, backed_up) in [(ARCHIVE_PVC, "true"), (RESTORED_PVC, "false")] {
        let pvc = m.pvc(name);
        let annotations = pvc.metadata.annotations.clone().unwrap_or_default();
        assert_eq!(
            annotations.get(K8UP_BACKUP_ANNOTATION).map(String::as_str),
            Some(backed_up),
            "{name}"
        );
        let spec = pvc.spec.as_ref().unwrap();
        assert_eq!(
            spec.access_modes.as_deref(),
            Some(&["ReadWriteOnce".to_owned()][..]),
            "{name}"
        );
        let storage = spec
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage"));
        assert!(storage.is_some(), "{name} has no size");
    }
}

#[test]
fn backup_rbac_grants_no_writes_beyond_its_own_claim() {
    let m = Manifests::load();
    let grants = grants_for(&m, BACKUP_SA);
    let problems = backup_rbac_problems(&grants);
    assert!(problems.is_empty(), "{problems:#?}");
    // ... and enough to do its job.
    let io = "image.openshift.io";
    assert!(allows(&grants, io, "imagestreams", "list", true));
    assert!(allows(&grants, io, "imagestreams/layers", "get", true));
    assert!(allows(
        &grants,
        "storage.k8s.io",
        "storageclasses",
        "get",
        true
    ));
    assert!(allows(
        &grants,
        "",
        "persistentvolumeclaims",
        "patch",
        false
    ));
    assert!(allows(&grants, "", "persistentvolumeclaims", "get", false));
    for verb in ["create", "update", "patch", "delete"] {
        assert!(!allows(&grants, io, "imagestreams", verb, false), "{verb}");
        assert!(
            !allows(&grants, io, "imagestreams/layers", verb, false),
            "{verb}"
        );
    }
    // The Role's resourceNames pins the claim the backup resizes.
    let pinned: Vec<_> = m
        .roles
        .iter()
        .flat_map(|(_, r)| r.rules.iter().flatten())
        .filter(|r| {
            r.resources
                .iter()
                .flatten()
                .any(|x| x == "persistentvolumeclaims")
        })
        .map(|r| r.resource_names.clone())
        .collect();
    assert_eq!(pinned, [Some(vec![ARCHIVE_PVC.to_owned()])]);
}

#[test]
fn backup_rbac_check_rejects_write_rights() {
    let rule = |resources: &[&str], verbs: &[&str], names: Option<&[&str]>| PolicyRule {
        api_groups: Some(vec!["image.openshift.io".into()]),
        resources: Some(resources.iter().map(|s| s.to_string()).collect()),
        verbs: verbs.iter().map(|s| s.to_string()).collect(),
        resource_names: names.map(|n| n.iter().map(|s| s.to_string()).collect()),
        non_resource_urls: None,
    };
    let grant = |rule, cluster_wide| Grant {
        rule,
        cluster_wide,
        via: "test".into(),
    };
    let read = grant(rule(&["imagestreams"], &["get", "list"], None), true);
    assert!(backup_rbac_problems(std::slice::from_ref(&read)).is_empty());
    let push = grant(
        rule(&["imagestreams/layers"], &["get", "update"], None),
        true,
    );
    assert_eq!(backup_rbac_problems(&[read.clone(), push]).len(), 1);
    let star = grant(rule(&["*"], &["get"], None), true);
    assert_eq!(backup_rbac_problems(&[star]).len(), 1);
    let other_pvc = grant(
        rule(&["persistentvolumeclaims"], &["patch"], Some(&["other"])),
        false,
    );
    assert_eq!(backup_rbac_problems(&[other_pvc]).len(), 1);
    let own_pvc_everywhere = grant(
        rule(
            &["persistentvolumeclaims"],
            &["patch"],
            Some(&[ARCHIVE_PVC]),
        ),
        true,
    );
    assert_eq!(backup_rbac_problems(&[own_pvc_everywhere]).len(), 1);
}

#[test]
fn restore_rbac_can_push_but_not_delete() {
    let m = Manifests::load();
    let grants = grants_for(&m, RESTORE_SA);
    let io = "image.openshift.io";
    assert!(allows(&grants, io, "imagestreams/layers", "update", true));
    assert!(allows(&grants, io, "imagestreams", "create", true));
    assert!(allows(&grants, io, "imagestreams", "patch", true));
    for g in &grants {
        for verb in &g.rule.verbs {
            assert!(
                !matches!(verb.as_str(), "delete" | "deletecollection" | "*"),
                "{}: restore may {verb}",
                g.via
            );
        }
    }
    // The two identities stay apart.
    assert!(!grants_for(&m, BACKUP_SA)
        .iter()
        .any(|g| g.via.contains("pusher")));
}

// ---------------------------------------------------------------------------
// Tests: references between files
// ---------------------------------------------------------------------------

/// (claim, mount path) of every PVC a pod mounts.
fn mounted_claims(spec: &PodSpec) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for v in spec.volumes.iter().flatten() {
        let Some(pvc) = &v.persistent_volume_claim else {
            continue;
        };
        for c in spec
            .init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
        {
            for mount in c
                .volume_mounts
                .iter()
                .flatten()
                .filter(|m| m.name == v.name)
            {
                out.push((pvc.claim_name.clone(), mount.mount_path.clone()));
            }
        }
    }
    out
}

#[test]
fn names_resolve_across_files() {
    let m = Manifests::load();
    let sas: BTreeSet<String> = m
        .service_accounts
        .iter()
        .filter_map(|(_, s)| s.metadata.name.clone())
        .collect();
    assert_eq!(
        sas,
        BTreeSet::from([BACKUP_SA.to_owned(), RESTORE_SA.to_owned()])
    );
    for (at, spec) in m.pod_specs() {
        let sa = spec.service_account_name.clone().unwrap_or_default();
        assert!(
            sas.contains(&sa),
            "{at}: service account `{sa}` is not defined"
        );
        let volumes: BTreeSet<_> = spec
            .volumes
            .iter()
            .flatten()
            .map(|v| v.name.clone())
            .collect();
        for c in spec
            .init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
        {
            for mount in c.volume_mounts.iter().flatten() {
                assert!(
                    volumes.contains(&mount.name),
                    "{at}: no volume {}",
                    mount.name
                );
            }
        }
        for (claim, path) in mounted_claims(&spec) {
            m.pvc(&claim);
            assert_eq!(path, "/archive", "{at}: {claim} mounted at {path}");
        }
    }
    for (doc, b) in &m.cluster_role_bindings {
        for s in b.subjects.iter().flatten() {
            assert!(
                sas.contains(&s.name) && s.namespace.as_deref() == Some(NAMESPACE),
                "{}",
                doc.at()
            );
        }
    }
    for (doc, b) in &m.role_bindings {
        for s in b.subjects.iter().flatten() {
            assert!(
                sas.contains(&s.name) && s.namespace.as_deref() == Some(NAMESPACE),
                "{}",
                doc.at()
            );
        }
    }
    // Every binding's role exists (grants_for panics otherwise).
    grants_for(&m, BACKUP_SA);
    grants_for(&m, RESTORE_SA);
    let restore = m.k8up_of("Restore")[0];
    m.pvc(restore.str_at("/spec/restoreMethod/folder/claimName"));
}

#[test]
fn kustomization_lists_exactly_the_permanent_files_in_order() {
    let m = Manifests::load();
    let k = &m.kustomizations[0];
    assert_eq!(k.file, "jobs/kustomization.yaml");
    let listed: Vec<String> = k
        .value
        .get("resources")
        .and_then(Value::as_array)
        .expect("resources")
        .iter()
        .map(|r| r.as_str().expect("resource path").to_owned())
        .collect();
    let mut on_disk: Vec<String> = fs::read_dir(Path::new(ROOT).join("jobs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .filter(|n| n != "kustomization.yaml")
        .collect();
    on_disk.sort();
    assert_eq!(listed, on_disk, "jobs/kustomization.yaml is out of date");
    for name in &listed {
        assert!(
            name.len() > 3 && name[..2].bytes().all(|b| b.is_ascii_digit()) && &name[2..3] == "-",
            "{name}: top-level files of jobs/ are numbered in apply order"
        );
    }
    // Nothing that starts work at once is applied with the rest.
    for (doc, _) in &m.jobs {
        assert!(
            !listed.iter().any(|l| doc.file.ends_with(l.as_str())),
            "{}",
            doc.at()
        );
    }
}

// ---------------------------------------------------------------------------
// Tests: Containerfile
// ---------------------------------------------------------------------------

#[test]
fn containerfile_matches_the_manifests() {
    let text = fs::read_to_string(Path::new(ROOT).join("Containerfile")).expect("Containerfile");
    let instructions: Vec<(String, String)> = text
        .replace("\\\n", " ")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (op, rest) = l.split_once(' ').unwrap_or((l, ""));
            (op.to_ascii_uppercase(), rest.trim().to_owned())
        })
        .collect();
    let all = |op: &str| -> Vec<&str> {
        instructions
            .iter()
            .filter(|(o, _)| o == op)
            .map(|(_, r)| r.as_str())
            .collect()
    };
    let froms = all("FROM");
    assert_eq!(froms.len(), 2, "multi-stage: builder and runtime");
    assert!(
        froms[0].starts_with("docker.io/library/rust:1-bookworm"),
        "{froms:?}"
    );
    assert!(
        all("RUN")
            .iter()
            .any(|r| r.contains("cargo build --release --locked")),
        "the builder must build with --locked"
    );
    assert!(
        all("COPY")
            .iter()
            .any(|c| c.starts_with("--from=") && c.ends_with(BINARY_PATH)),
        "the binary must land at {BINARY_PATH}"
    );
    // Everything after the last FROM is the runtime image.
    let last_from = instructions.iter().rposition(|(o, _)| o == "FROM").unwrap();
    let runtime = &instructions[last_from..];
    let user = runtime
        .iter()
        .rev()
        .find(|(o, _)| o == "USER")
        .map(|(_, u)| u.as_str())
        .expect("runtime stage sets USER");
    // The kubelet can only enforce runAsNonRoot on a numeric UID.
    let uid: u32 = user
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("USER {user} is not numeric"));
    assert_ne!(uid, 0);
    let entrypoint = runtime
        .iter()
        .rev()
        .find(|(o, _)| o == "ENTRYPOINT")
        .map(|(_, e)| e.as_str())
        .expect("ENTRYPOINT");
    let entrypoint: Vec<String> = serde_json::from_str(entrypoint).expect("exec-form ENTRYPOINT");
    // container_argv() assumes that a container without `command` runs this.
    assert_eq!(entrypoint, [BINARY_PATH]);

    let ignore =
        fs::read_to_string(Path::new(ROOT).join(".containerignore")).expect(".containerignore");
    assert!(ignore
        .lines()
        .any(|l| l.trim().trim_end_matches('/') == "target"));
    let docker_ignore =
        fs::read_to_string(Path::new(ROOT).join(".dockerignore")).expect(".dockerignore");
    assert_eq!(
        ignore, docker_ignore,
        ".dockerignore and .containerignore differ"
    );
}

/// `M H * * *` as minutes after midnight.
fn daily_minute(cron: &str) -> u32 {
    let f: Vec<&str> = cron.split_whitespace().collect();
    assert!(
        f.len() == 5 && f[2..] == ["*", "*", "*"],
        "{cron:?}: a daily schedule `M H * * *` is expected"
    );
    f[1].parse::<u32>().expect("hour") * 60 + f[0].parse::<u32>().expect("minute")
}

#[test]
fn the_nightly_backup_ends_before_k8up_snapshots_the_claim() {
    // restic walks the claim in name order (blobs/ before index.json): a
    // commit during the walk would leave an inconsistent snapshot. So the
    // writing CronJob must be over, by its deadline, before the Schedule's
    // backup starts, and its finished pods gone soon after.
    let m = Manifests::load();
    let (doc, cj) = &m.cron_jobs[0];
    let spec = &cj.spec;
    let job = spec.job_template.spec.as_ref().expect("job spec");
    let deadline = job
        .active_deadline_seconds
        .unwrap_or_else(|| panic!("{}: no activeDeadlineSeconds", doc.at()));
    let start = daily_minute(&spec.schedule);
    let late = spec
        .starting_deadline_seconds
        .unwrap_or_else(|| panic!("{}: no startingDeadlineSeconds", doc.at()));
    let ends = start as i64 * 60 + late + deadline;
    let k8up = daily_minute(m.k8up_of("Schedule")[0].str_at("/spec/backup/schedule"));
    assert!(
        ends < k8up as i64 * 60,
        "{}: starts at minute {start} (up to {late} s late), may run until second {ends}, \
         K8up starts at minute {k8up}",
        doc.at()
    );
    assert_eq!(spec.concurrency_policy.as_deref(), Some("Forbid"));
    // Finished successful pods would mislead K8up's RWO placement.
    assert_eq!(spec.successful_jobs_history_limit, Some(0), "{}", doc.at());
}

//! A tmpfs standing for a PVC's volume, and the kubelet's part of a resize:
//! after the fake API accepts a PVC PATCH, the filesystem grows a little
//! later (`mount -o remount,size=...`). Needs root.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use super::fake_kube::{self, FakeKube, PatchEvent};

/// Fails the test unless it runs as root (never skips).
pub fn require_root() {
    let out = Command::new("id").arg("-u").output().expect("run id -u");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "this test needs root: it mounts a tmpfs as the PVC's volume and grows it with \
         `mount -o remount,size=...` as the kubelet would. Run the tests as root."
    );
}

/// Runs a command and fails the test with its stderr when it fails.
pub fn sh(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Mounts a tmpfs and unmounts it when dropped, even when the test panics.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`4m`, `2560k`) at `dir` (created if missing).
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        sh(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                &dir.display().to_string(),
            ],
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Still busy (a child process finishing): detach it.
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// A PATCH hook for the fake API that plays the kubelet: the PVC shows
/// `FileSystemResizePending`, then after `delay` the tmpfs at `mount_point`
/// is remounted at the new size and the PVC's capacity follows.
pub fn kubelet_resize(
    mount_point: PathBuf,
    delay: Duration,
) -> impl Fn(&PatchEvent, &FakeKube) + Send + Sync + 'static {
    move |ev, fake| {
        let size = ev.new_storage.clone().expect("storage in the patch");
        let mut status = fake.pvc(&ev.namespace, &ev.name).unwrap()["status"].clone();
        status["conditions"] = json!([{"type": "FileSystemResizePending", "status": "True"}]);
        fake.set_pvc_status(&ev.namespace, &ev.name, status.clone());
        let (fake, ev, mnt) = (fake.clone(), ev.clone(), mount_point.clone());
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            let bytes = fake_kube::quantity_bytes(&size);
            sh(
                "mount",
                &[
                    "-o",
                    &format!("remount,size={bytes}"),
                    &mnt.display().to_string(),
                ],
            );
            status["capacity"]["storage"] = json!(size);
            status.as_object_mut().unwrap().remove("conditions");
            fake.set_pvc_status(&ev.namespace, &ev.name, status);
        });
    }
}

//! `kiln upgrade --k3s` rewrites the profile in place of the user's file:
//! it must land in the file the user means (through symlinks, keeping hard
//! links, owner, group and mode), refuse files it may not write, and never
//! overwrite an edit made while it ran.

use std::fs;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use kiln::deliver::upgrade::{ProfileEdit, replace_file, set_k3s_version, write_k3s_version};

const OLD: &str = "v1.31.1+k3s1";
const NEW: &str = "v1.31.2+k3s1";
const PROFILE: &str = "# the lab\n[cluster]\nname = \"lab\"\n\n[k3s]\n\
                       version = \"v1.31.1+k3s1\" # pinned\n\n[[nodes]]\nname = \"s1\"\n\
                       role = \"server\"\n";

fn bumped() -> String {
    PROFILE.replace(OLD, NEW)
}

/// Every name in `dir`, sorted: to see that no temp file is left behind.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn write_profile(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, PROFILE).unwrap();
    path
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn a_symlinked_profile_is_edited_through_the_link_and_the_link_kept() {
    let dir = tempfile::tempdir().unwrap();
    let real_dir = dir.path().join("profiles");
    let link_dir = dir.path().join("work");
    fs::create_dir_all(&real_dir).unwrap();
    fs::create_dir_all(&link_dir).unwrap();
    let real = write_profile(&real_dir, "lab.toml");
    let link = link_dir.join("lab.toml");
    std::os::unix::fs::symlink("../profiles/lab.toml", &link).unwrap();

    replace_file(&link, &bumped()).unwrap();

    let meta = fs::symlink_metadata(&link).unwrap();
    assert!(meta.file_type().is_symlink(), "the symlink was replaced");
    assert_eq!(
        fs::read_link(&link).unwrap(),
        Path::new("../profiles/lab.toml")
    );
    assert_eq!(fs::read_to_string(&real).unwrap(), bumped());
    assert_eq!(names(&real_dir), ["lab.toml"]);
    assert_eq!(names(&link_dir), ["lab.toml"]);
}

#[test]
fn a_read_only_profile_is_refused_naming_the_file_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_profile(dir.path(), "lab.toml");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o444)).unwrap();

    let err = format!("{:#}", replace_file(&path, &bumped()).unwrap_err());

    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("read-only"), "{err}");
    assert!(err.contains("chmod u+w"), "{err}");
    assert!(err.contains("nothing written"), "{err}");
    assert_eq!(fs::read_to_string(&path).unwrap(), PROFILE);
    assert_eq!(mode(&path), 0o444);
    assert_eq!(names(dir.path()), ["lab.toml"]);
}

#[test]
fn the_new_profile_keeps_the_owner_group_and_mode() {
    if !is_root() {
        eprintln!("skipped: giving a file to uid 1234 needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = write_profile(dir.path(), "lab.toml");
    std::os::unix::fs::chown(&path, Some(1234), Some(2345)).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();

    replace_file(&path, &bumped()).unwrap();

    let meta = fs::metadata(&path).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (1234, 2345));
    assert_eq!(mode(&path), 0o640);
    assert_eq!(fs::read_to_string(&path).unwrap(), bumped());
}

#[test]
fn a_hard_linked_profile_stays_one_file_under_both_names() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_profile(dir.path(), "lab.toml");
    let other = dir.path().join("lab-copy.toml");
    fs::hard_link(&path, &other).unwrap();
    let inode = fs::metadata(&path).unwrap().ino();

    replace_file(&path, &bumped()).unwrap();

    let (a, b) = (fs::metadata(&path).unwrap(), fs::metadata(&other).unwrap());
    assert_eq!((a.ino(), b.ino()), (inode, inode), "a hard link was broken");
    assert_eq!(a.nlink(), 2);
    assert_eq!(fs::read_to_string(&other).unwrap(), bumped());
    assert_eq!(names(dir.path()), ["lab-copy.toml", "lab.toml"]);
}

#[test]
fn a_new_file_gets_mode_0644_whatever_the_temp_file_had() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln-upgrade-plans.yaml");

    replace_file(&path, "plans\n").unwrap();

    assert_eq!(fs::read_to_string(&path).unwrap(), "plans\n");
    assert_eq!(mode(&path), 0o644);
}

#[test]
fn an_edit_made_while_upgrade_ran_is_kept_and_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_profile(dir.path(), "lab.toml");
    let edit = ProfileEdit::read(&path).unwrap();
    let (_, new_text) = set_k3s_version(&path, edit.text(), NEW).unwrap();
    // The user saves their own change between kiln's read and its write.
    let theirs = PROFILE.replace("name = \"s1\"", "name = \"s2\"");
    fs::write(&path, &theirs).unwrap();

    let err = format!("{:#}", edit.publish(&new_text).unwrap_err());

    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(
        err.contains("changed while kiln upgrade ran; nothing written; run it again"),
        "{err}"
    );
    assert_eq!(fs::read_to_string(&path).unwrap(), theirs);
    assert_eq!(names(dir.path()), ["lab.toml"]);
}

#[test]
fn an_edit_made_to_a_hard_linked_profile_while_upgrade_ran_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_profile(dir.path(), "lab.toml");
    fs::hard_link(&path, dir.path().join("lab-copy.toml")).unwrap();
    let edit = ProfileEdit::read(&path).unwrap();
    let (_, new_text) = set_k3s_version(&path, edit.text(), NEW).unwrap();
    let theirs = format!("{PROFILE}# mine\n");
    fs::write(&path, &theirs).unwrap();

    let err = format!("{:#}", edit.publish(&new_text).unwrap_err());

    assert!(err.contains("changed while kiln upgrade ran"), "{err}");
    assert_eq!(fs::read_to_string(&path).unwrap(), theirs);
}

#[test]
fn an_unchanged_profile_is_edited_through_read_and_publish() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_profile(dir.path(), "lab.toml");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    let edit = ProfileEdit::read(&path).unwrap();
    let (old, new_text) = set_k3s_version(&path, edit.text(), NEW).unwrap();

    edit.publish(&new_text).unwrap();

    assert_eq!(old, OLD);
    assert_eq!(fs::read_to_string(&path).unwrap(), bumped());
    assert_eq!(mode(&path), 0o600);
    assert_eq!(names(dir.path()), ["lab.toml"]);
}

#[test]
fn write_k3s_version_reads_edits_and_publishes_through_a_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let real = write_profile(dir.path(), "real.toml");
    let link = dir.path().join("lab.toml");
    std::os::unix::fs::symlink("real.toml", &link).unwrap();

    let (old, text) = write_k3s_version(&link, NEW).unwrap();

    assert_eq!((old.as_str(), text.as_str()), (OLD, bumped().as_str()));
    assert!(
        fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(fs::read_to_string(&real).unwrap(), bumped());
    assert_eq!(names(dir.path()), ["lab.toml", "real.toml"]);
}

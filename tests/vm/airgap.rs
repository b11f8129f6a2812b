//! Air-gap images in a booted node: the release's tarball (given with
//! `--airgap-images`, as an offline build would) and one of the profile's
//! sit read-only at `agent/images` with the digests `manifest.json`
//! records, and k3s (here the double, which lists what it would import)
//! sees exactly those.

use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use kiln::build::BuildOptions;
use kiln::verify::checks::{self as verify, Check, Report};
use kiln::verify::vm::{Vm, VmConfig};
use sha2::{Digest as _, Sha256};

use super::{assert_all_pass, expect_for, files_for, fixture_from, k3s_binary, vm_lock};

/// A docker-archive image tarball (what `docker save` writes and k3s
/// imports), zstd-compressed: one layer with one file, its config, and
/// a manifest naming `tag`.
fn write_image_archive(path: &Path, tag: &str) {
    let mut layer = tar::Builder::new(Vec::new());
    let body = format!("{tag}\n");
    let mut h = tar::Header::new_gnu();
    h.set_size(body.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    layer.append_data(&mut h, "hello", body.as_bytes()).unwrap();
    let layer = layer.into_inner().unwrap();
    let layer_sha = hex::encode(Sha256::digest(&layer));
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{layer_sha}")] },
    })
    .to_string();
    let config_sha = hex::encode(Sha256::digest(config.as_bytes()));
    let manifest = serde_json::json!([{
        "Config": format!("{config_sha}.json"),
        "RepoTags": [tag],
        "Layers": [format!("{layer_sha}/layer.tar")],
    }])
    .to_string();
    let mut archive = tar::Builder::new(Vec::new());
    for (name, bytes) in [
        (format!("{layer_sha}/layer.tar"), layer),
        (format!("{config_sha}.json"), config.into_bytes()),
        ("manifest.json".to_string(), manifest.into_bytes()),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        archive.append_data(&mut h, name, bytes.as_slice()).unwrap();
    }
    let tarball = archive.into_inner().unwrap();
    let mut z = zstd::Encoder::new(std::fs::File::create(path).unwrap(), 3).unwrap();
    z.write_all(&tarball).unwrap();
    z.finish().unwrap();
}

#[test]
fn air_gap_images_sit_where_k3s_imports_them() {
    let tmp = tempfile::tempdir().unwrap();
    let release = tmp.path().join("k3s-airgap-images-amd64.tar.zst");
    let app = tmp.path().join("app.tar.zst");
    write_image_archive(&release, "docker.io/library/kiln-test-release:v1");
    write_image_archive(&app, "docker.io/library/kiln-test-app:v1");
    let text = super::vm_profile().replacen(
        "[k3s]\n",
        &format!(
            "[k3s]\nairgap = true\nimage-tarballs = [\"{}\"]\n",
            app.display()
        ),
        1,
    );
    let f = fixture_from(&text, "vm.toml");
    let out = f.dir.path().join("out");
    let opts = BuildOptions {
        out: out.clone(),
        nodes: vec!["a1".into()],
        k3s_binary: Some(k3s_binary().clone()),
        airgap_images: Some(release),
        cache: kiln::inputs::cache::cache_dir(),
        ..BuildOptions::default()
    };
    kiln::build::build(&f.plan, &f.secrets, &opts).unwrap();
    let images = kiln::image::manifest::Manifest::read(&out).unwrap().images;
    assert_eq!(images.len(), 2, "{images:?}");

    let _g = vm_lock();
    let files = files_for(&f, "a1");
    let e = expect_for(&f, "a1", &files);
    let mut cfg = VmConfig::new("a1", &out.join("a1.img"));
    verify::use_nic_of(&mut cfg, e.node);
    let mut vm = Vm::start(&cfg).unwrap();
    vm.wait_serial("kiln-init: switch_root", 0, verify::BOOT_TIMEOUT)
        .unwrap();
    vm.wait_ssh(&f.key, verify::BOOT_TIMEOUT).unwrap();
    vm.wait_until("k3s to become active", Duration::from_secs(300), |vm| {
        Ok(vm
            .sh(&f.key, "systemctl is-active k3s")
            .ok()
            .filter(|s| s.trim() == "active"))
    })
    .unwrap();
    let mut checks: Vec<Check> = Vec::new();
    kiln::verify::airgap::check_airgap(&vm, &f.key, &e, &images, &mut checks).unwrap();
    let _ = vm.ssh_as(&f.key, "root", "systemctl poweroff", b"");
    let _ = vm.wait_exit(Duration::from_secs(120));
    let r = Report {
        node: "a1 (air-gap)".into(),
        checks,
        ..Report::default()
    };
    assert_all_pass(&r);
}

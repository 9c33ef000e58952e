use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

/// Builds the kernel programs (agent-ebpf) for the BPF target with the nightly toolchain and
/// puts the object where `include_bytes_aligned!` finds it.
fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        // Linting and host-only checks skip the eBPF build; leave an empty object so the
        // agent still compiles. Loading it fails at run time with a clear error.
        let out = PathBuf::from(env::var("OUT_DIR").context("OUT_DIR not set")?);
        let placeholder = out.join("sockscope");
        if !placeholder.exists() {
            fs::write(&placeholder, b"").context("writing the placeholder eBPF object")?;
        }
        return Ok(());
    }
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "agent-ebpf")
        .ok_or_else(|| anyhow!("package agent-ebpf not found in the workspace"))?;
    let root = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("agent-ebpf manifest has no parent directory"))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root.as_str(),
            ..Default::default()
        }],
        Toolchain::default(),
    )
}

use which::which;

/// Rebuild the kernel programs when bpf-linker changes: cargo does not track linkers.
fn main() {
    if let Ok(bpf_linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", bpf_linker.display());
    }
}

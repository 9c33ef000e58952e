use anyhow::Result;
use testkit::*;
#[test]
fn show_routes() -> Result<()> {
    let lab = VethLab::new()?;
    lab.server.run(|| {
        print!(
            "{}",
            std::fs::read_to_string("/proc/thread-self/net/ipv6_route").unwrap()
        )
    })?;
    Ok(())
}

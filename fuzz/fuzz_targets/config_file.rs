//! `--config.file`: any bytes into the TOML config parser. It must never panic; a file it
//! accepts must merge with an empty command line (every value was validated by its flag).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(settings) = agent::config::parse(text) {
        if let Err(e) = agent::config::merge(&settings, Vec::new()) {
            panic!("accepted file does not merge: {e}\n{text}");
        }
    }
});

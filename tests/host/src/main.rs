//! `spin-bulk-host --wasm PATH --manifest spin.toml [--component ID] [--listen ADDR] [--stats FILE]`
//!
//! Application variables come from `SPIN_VARIABLE_*`. Prints `serving http://ADDR` on stdout
//! once listening; one line per request on stderr (never headers or bodies: they carry
//! secrets); with `--stats FILE`, appends one JSON line per finished request.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use spin_bulk_host::{Host, HostConfig, RequestStat};

const USAGE: &str = "usage: spin-bulk-host --wasm PATH --manifest spin.toml [--component ID] \
                     [--listen 127.0.0.1:3000] [--stats FILE]";

fn main() -> Result<()> {
    let mut wasm = None;
    let mut manifest = None;
    let mut component = None;
    let mut listen = "127.0.0.1:3000".to_string();
    let mut stats: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        if name == "--help" || name == "-h" {
            println!("{USAGE}");
            return Ok(());
        }
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .with_context(|| format!("{name} needs a value\n{USAGE}"))
        };
        match name.as_str() {
            "--wasm" => wasm = Some(PathBuf::from(value()?)),
            "--manifest" => manifest = Some(PathBuf::from(value()?)),
            "--component" => component = Some(value()?),
            "--listen" => listen = value()?,
            "--stats" => stats = Some(PathBuf::from(value()?)),
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    let (Some(wasm), Some(manifest)) = (wasm, manifest) else {
        bail!("--wasm and --manifest are required\n{USAGE}");
    };

    let mut config = HostConfig::new(wasm, manifest).with_env();
    config.component = component;
    config.listen = listen
        .parse()
        .with_context(|| format!("--listen {listen:?} is not an address"))?;

    let stats_file = match &stats {
        Some(path) => Some(Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?,
        )),
        None => None,
    };
    let observer = move |s: &RequestStat| {
        eprintln!(
            "{} {} {} {}ms peak-memory={} {}",
            s.method,
            s.path,
            s.status,
            s.ms,
            s.peak_memory,
            s.outcome.as_str()
        );
        if let Some(f) = &stats_file {
            let mut f = f.lock().unwrap();
            if let Err(e) = writeln!(f, "{}", s.to_json()) {
                eprintln!("spin-bulk-host: writing stats: {e}");
            }
        }
    };

    let host = Host::start_observed(config, Some(Box::new(observer)))?;
    println!("serving {}", host.url());
    std::io::stdout().flush()?;

    // Serve until interrupted.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        anyhow::Ok(())
    })?;
    drop(host);
    Ok(())
}

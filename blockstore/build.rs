//! Build script: links SPDK when the `spdk` feature is on.
//!
//! With the feature off it does nothing. With it on, it asks `pkg-config` (the binary, to keep
//! build dependencies at zero) for SPDK's libraries. SPDK is rarely installed, and never in CI, so
//! when `pkg-config` cannot find it the script only warns: the backend still type-checks
//! (`cargo check --features spdk`), but nothing that calls into SPDK will link. Point
//! `PKG_CONFIG_PATH` at `<spdk>/build/lib/pkgconfig` (and at DPDK's, if SPDK uses its own) to link.
//!
//! What is linked and why (see also `/work/shared/DEPENDENCIES.md`):
//! * `spdk_event_bdev` registers the bdev subsystem (and, through its `Requires`, accel, iobuf,
//!   sock, vmd ...) from C constructors, and bdev modules such as `spdk_bdev_malloc` register
//!   the same way. Nothing references their symbols, so with the linker's `--as-needed` (which
//!   rustc turns on) they would be dropped: they are linked inside `-Wl,--no-as-needed`.
//! * `pkg-config --libs --static spdk_syslibs` even for SPDK's shared build: its `.so` files do
//!   not record their dependencies on liburing, ISA-L, OpenSSL, libuuid ...
//! * An rpath (`DT_RPATH`, which also applies to the SPDK libraries' own dependencies) to every
//!   library directory, SPDK's first, so that SPDK's ISA-L wins over Debian's (same soname,
//!   fewer symbols).
//!
//! Only SPDK's shared build (`./configure --with-shared`) is supported.
//!
//! Cargo passes `rustc-link-arg` to this package's own tests, examples and binaries only. The
//! `-L`/`-l` flags are also emitted as `rustc-link-search`/`rustc-link-lib`, which reach
//! dependent binaries, but there `--as-needed` drops the constructor-only libraries again; a
//! dependent binary must add the `--no-as-needed` group itself (`hw-tests/README.md` shows how).
//! `SpdkEnv::init` reports a missing bdev subsystem clearly if it does not.
//!
//! `CAIRN_SPDK_BDEV_MODULES` (comma-separated `pkg-config` names) overrides the optional bdev
//! modules linked when present: `spdk_bdev_malloc`, `spdk_bdev_nvme`, `spdk_bdev_aio`,
//! `spdk_bdev_uring`.

use std::env;
use std::path::Path;
use std::process::Command;

/// Libraries the backend calls into or cannot run without.
const REQUIRED: &[&str] = &[
    "spdk_event_bdev",
    "spdk_event",
    "spdk_bdev",
    "spdk_init",
    "spdk_rpc",
    "spdk_thread",
    "spdk_env_dpdk",
];

/// Bdev modules linked when `pkg-config` knows them.
const DEFAULT_MODULES: &[&str] = &[
    "spdk_bdev_malloc",
    "spdk_bdev_nvme",
    "spdk_bdev_aio",
    "spdk_bdev_uring",
];

const NOT_FOUND: &str =
    "SPDK not found by pkg-config: the spdk backend type-checks but will not link";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_SPDK").is_none() {
        return;
    }
    for var in [
        "PKG_CONFIG",
        "PKG_CONFIG_PATH",
        "PKG_CONFIG_LIBDIR",
        "PKG_CONFIG_SYSROOT_DIR",
        "CAIRN_SPDK_BDEV_MODULES",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    match spdk_flags() {
        Ok(flags) => emit(&flags),
        Err(Missing::Spdk) => println!("cargo:warning={NOT_FOUND}"),
        Err(Missing::SharedLibraries) => println!(
            "cargo:warning=SPDK found by pkg-config, but not as shared libraries (build SPDK with \
             ./configure --with-shared): the spdk backend type-checks but will not link"
        ),
    }
}

enum Missing {
    Spdk,
    SharedLibraries,
}

/// Linker flags from `pkg-config`: SPDK's libraries, then the system libraries they use.
struct Flags {
    spdk: Vec<String>,
    system: Vec<String>,
}

fn spdk_flags() -> Result<Flags, Missing> {
    if pkg_config(&["--exists", "spdk_bdev"]).is_none() {
        return Err(Missing::Spdk);
    }
    let modules: Vec<String> = match env::var("CAIRN_SPDK_BDEV_MODULES") {
        Ok(list) => list
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .map(str::to_owned)
            .collect(),
        Err(_) => DEFAULT_MODULES
            .iter()
            .filter(|name| pkg_config(&["--exists", name]).is_some())
            .map(|name| (*name).to_owned())
            .collect(),
    };
    let mut args = vec!["--libs"];
    args.extend(REQUIRED);
    args.extend(modules.iter().map(String::as_str));
    let spdk = pkg_config(&args).ok_or(Missing::Spdk)?;
    // Older SPDK releases have no spdk_syslibs; their .so files then carry what they need.
    let system = if pkg_config(&["--exists", "spdk_syslibs"]).is_some() {
        pkg_config(&["--libs", "--static", "spdk_syslibs"]).ok_or(Missing::Spdk)?
    } else {
        String::new()
    };
    let flags = Flags {
        spdk: spdk.split_whitespace().map(str::to_owned).collect(),
        system: system.split_whitespace().map(str::to_owned).collect(),
    };
    let has_shared_bdev = flags
        .spdk
        .iter()
        .filter_map(|flag| flag.strip_prefix("-L"))
        .any(|dir| Path::new(dir).join("libspdk_bdev.so").exists());
    if !has_shared_bdev {
        return Err(Missing::SharedLibraries);
    }
    Ok(flags)
}

fn emit(flags: &Flags) {
    let all = || flags.spdk.iter().chain(&flags.system);
    let mut dirs: Vec<&str> = Vec::new();
    for flag in all() {
        if let Some(dir) = flag.strip_prefix("-L")
            && !dirs.contains(&dir)
        {
            dirs.push(dir);
        }
    }
    // Stable sort: SPDK's directories ahead of any system directory, in the search path and the
    // rpath alike, so that SPDK's ISA-L is the one linked and loaded.
    dirs.sort_by_key(|dir| is_system_dir(dir));
    // For dependents: enough for the symbols they reference.
    for dir in &dirs {
        println!("cargo:rustc-link-search=native={dir}");
    }
    for flag in all() {
        if let Some(lib) = flag.strip_prefix("-l") {
            println!("cargo:rustc-link-lib=dylib={lib}");
        }
    }
    // For this package's tests and examples: everything, in order, constructors kept. The
    // system libraries go inside the group too: the SPDK libraries use them without recording
    // them, so nothing else makes the linker keep them.
    println!("cargo:rustc-link-arg=-Wl,--disable-new-dtags");
    for dir in dirs.iter().filter(|dir| !is_system_dir(dir)) {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    for dir in &dirs {
        println!("cargo:rustc-link-arg=-L{dir}");
    }
    for flag in all().filter(|flag| !flag.starts_with("-L")) {
        println!("cargo:rustc-link-arg={flag}");
    }
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
}

/// A directory the dynamic loader searches anyway.
fn is_system_dir(dir: &str) -> bool {
    ["/lib", "/lib64", "/usr/lib", "/usr/lib64"]
        .iter()
        .any(|prefix| dir == *prefix || dir.starts_with(&format!("{prefix}/")))
}

/// Runs `pkg-config` with `args`; `Some(stdout)` if it ran and succeeded.
fn pkg_config(args: &[&str]) -> Option<String> {
    let pkg_config = env::var("PKG_CONFIG").unwrap_or_else(|_| "pkg-config".to_owned());
    let output = Command::new(pkg_config).args(args).output().ok()?;
    if !output.status.success() {
        return None;
    }
    String::from_utf8(output.stdout).ok()
}

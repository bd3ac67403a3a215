//! Compiles `cpp/stop_callback.cpp` with the machine's C++ compiler (C++20,
//! libstdc++'s `<stop_token>`). Without one the crate still builds, with
//! `StopSource::new()` answering `None`, and the bench skips the peer: the
//! workspace must build on a machine with only the Rust toolchain and a C
//! compiler.

fn main() {
    println!("cargo:rerun-if-changed=cpp/stop_callback.cpp");
    let built = cc::Build::new()
        .cpp(true)
        .std("c++20")
        .opt_level(2)
        .file("cpp/stop_callback.cpp")
        .cargo_warnings(false)
        .try_compile("callcancel_cppbench");
    match built {
        Ok(()) => println!("cargo:rustc-cfg=callcancel_cpp"),
        Err(e) => println!(
            "cargo:warning=the libstdc++ std::stop_callback peer is not built ({e}); \
             benches/lifecycle.rs skips it"
        ),
    }
}

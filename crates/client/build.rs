//! Generates the client from `openapi.json`: the public document the gateway serves for the
//! shop (`GET /openapi.json`), in its OpenAPI 3.0 form (progenitor reads only 3.0). A test
//! (`crates/e2e/tests/public_api.rs`) keeps the file equal to what the gateway serves.

fn main() {
    let src = "openapi.json";
    println!("cargo:rerun-if-changed={src}");
    let text = std::fs::read_to_string(src).expect("openapi.json is readable");
    let spec: openapiv3::OpenAPI =
        serde_json::from_str(&text).expect("openapi.json is an OpenAPI 3.0 document");
    let mut generator = progenitor::Generator::default();
    let tokens = generator
        .generate_tokens(&spec)
        .expect("progenitor generates a client from openapi.json");
    let file = syn::parse2(tokens).expect("the generated client parses");
    let out =
        std::path::Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR is set")).join("client.rs");
    std::fs::write(out, prettyplease::unparse(&file)).expect("OUT_DIR is writable");
}
